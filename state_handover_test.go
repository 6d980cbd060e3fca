package graceful_test

import (
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestStateHandOver: a payload offered by each generation survives 10
// upgrades intact (each adds its PID to the history it received); a failed
// upgrade leaves the old process's state as it was; a binary that reads
// only another version of the payload starts cold and says why.
func TestStateHandOver(t *testing.T) {
	h := startHelper(t, []string{"-state"}, loadtest.Config{})
	state := func() string {
		t.Helper()
		resp, err := http.Get("http://" + h.Addr + "/state")
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return string(b)
	}
	assert.Equal(t, "version 0, err "+graceful.ErrNoState.Error()+"\n", state(), "a cold start")
	pids := []int{h.PID()}
	history := func() string {
		var b strings.Builder
		for _, pid := range pids {
			b.WriteString(strconv.Itoa(pid) + "\n")
		}
		return b.String()
	}
	for range 10 {
		u, err := h.Upgrade(t.Context(), 20*time.Second)
		require.NoError(t, err)
		require.Equal(t, "version 1, err <nil>\n"+history(), state(), "every generation's PID, in order")
		pids = append(pids, u.NewPID)
	}

	// A failed upgrade: the old process's state is untouched, and the next
	// upgrade passes it on as it was.
	h.setMode(modeExit)
	a := h.upgradeViaAPI()
	require.Contains(t, a.err, "exit status 3")
	before := "version 1, err <nil>\n" + history()[:len(history())-len(strconv.Itoa(pids[len(pids)-1]))-1]
	assert.Equal(t, before, state())
	h.setMode(modeOK)
	u, err := h.Upgrade(t.Context(), 20*time.Second)
	require.NoError(t, err)
	assert.Equal(t, "version 1, err <nil>\n"+history(), state())
	pids = append(pids, u.NewPID)

	// A build that reads only version 2: cold, with the reason.
	h.setMode(modeStateV2)
	_, err = h.Upgrade(t.Context(), 20*time.Second)
	require.NoError(t, err)
	assert.Equal(t, `version 1, err graceful: state "history": version 1 not understood (this build reads [2])`+"\n", state())
}

// TestStateLimit: MaxStateSize bounds the payloads, not the state file's
// framing: a payload of exactly the limit reaches the new process; one byte
// more is not written at all (the old process checks before it writes), and
// the new process starts cold.
func TestStateLimit(t *testing.T) {
	const limit = 1 << 20
	lim := strconv.Itoa(limit)
	h := startHelper(t, []string{"-state-pad", lim, "-max-state", lim}, loadtest.Config{})
	pad := func() string {
		t.Helper()
		resp, err := http.Get("http://" + h.Addr + "/state-pad")
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return string(b)
	}
	_, err := h.Upgrade(t.Context(), 20*time.Second)
	require.NoError(t, err)
	assert.Equal(t, lim+" bytes, err <nil>", pad(), "exactly the limit is carried")

	h.setMode(modeStateOver) // the next generation offers one byte more
	_, err = h.Upgrade(t.Context(), 20*time.Second)
	require.NoError(t, err)
	h.setMode(modeOK)
	_, err = h.Upgrade(t.Context(), 20*time.Second)
	require.NoError(t, err)
	assert.Equal(t, "0 bytes, err "+graceful.ErrNoState.Error(), pad(), "over the limit: a cold start")
}
