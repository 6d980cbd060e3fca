//go:build unix

package graceful

import (
	"os"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Malformed activation variables are an error that names the variable, and
// no descriptor is adopted.
func TestTakeActivatedMalformed(t *testing.T) {
	pid := strconv.Itoa(os.Getpid())
	cases := []struct {
		pid, fds, names string
		want            string
	}{
		{"abc", "1", "", "LISTEN_PID"},
		{"-4", "1", "", "LISTEN_PID"},
		{pid, "x", "", "LISTEN_FDS"},
		{pid, "-1", "", "LISTEN_FDS"},
		{pid, "100000", "", "LISTEN_FDS"},
		{pid, "2", "web", "LISTEN_FDNAMES"},
		{pid, "1000", "", "descriptor"}, // fd 3 is not a listening socket here
	}
	for _, c := range cases {
		t.Setenv("LISTEN_PID", c.pid)
		t.Setenv("LISTEN_FDS", c.fds)
		t.Setenv("LISTEN_FDNAMES", c.names)
		acts, err := takeActivated()
		require.Error(t, err, "%+v", c)
		assert.Contains(t, err.Error(), c.want)
		assert.Nil(t, acts)
		_, set := os.LookupEnv("LISTEN_FDS")
		assert.False(t, set, "variables removed")
	}
}

// Variables meant for another process (a child inherits the parent's) are
// ignored without error.
func TestTakeActivatedOtherPID(t *testing.T) {
	t.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()+1))
	t.Setenv("LISTEN_FDS", "1")
	acts, err := takeActivated()
	require.NoError(t, err)
	assert.Nil(t, acts)
}
