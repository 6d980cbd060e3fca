//go:build linux

package graceful_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestFaultSilentParentPipes: tableflip's variable set by hand, with
// descriptors 3 and 4 real pipes on which nothing ever arrives (their other
// ends stay open, so no EOF either), makes New fail once the wait for a
// parent's message is over, with an error naming the variable, instead of
// blocking forever without a listener or a log line.
func TestFaultSilentParentPipes(t *testing.T) {
	// As tableflip's parent passes them: descriptor 3 the write end of one
	// pipe, 4 the read end of another. Ours stay open until the end.
	readyR, readyW, err := os.Pipe()
	require.NoError(t, err)
	defer readyR.Close()
	defer readyW.Close()
	namesR, namesW, err := os.Pipe()
	require.NoError(t, err)
	defer namesR.Close()
	defer namesW.Close()
	self, err := os.Executable()
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, self, "-upgrade-timeout", "300ms")
	cmd.Env = append(os.Environ(), raceEnv, "GRACEFUL_TEST_HELPER=1", "TABLEFLIP_HAS_PARENT_7DIU3=yes")
	cmd.ExtraFiles = []*os.File{readyW, namesR}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err = cmd.Run()
	took := time.Since(start)
	require.NoError(t, ctx.Err(), "the helper blocked; killed after %v:\n%s", took, out.String())
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee, "the helper should have failed:\n%s", out.String())
	assert.Equal(t, 1, ee.ExitCode())
	assert.GreaterOrEqual(t, took, 300*time.Millisecond, "it waits as long as UpgradeTimeout")
	assert.Less(t, took, 5*time.Second)
	assert.Contains(t, out.String(), "TABLEFLIP_HAS_PARENT_7DIU3 is set but", "the error names the variable")
	assert.Contains(t, out.String(), "on descriptor 4 within 300ms", "and what it waited for")
}
