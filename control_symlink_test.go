//go:build linux

package graceful_test

import (
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestControlSocketSymlink: whoever can write to the control socket's
// directory replaces the socket file with a symbolic link to another file.
// At the next upgrade the new process must not change that file's mode
// (chmod follows links): it refuses to start with an error naming the path,
// the upgrade fails with its exit, and the old process serves on.
func TestControlSocketSymlink(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "control.sock")
	h := startHelper(t, []string{"-upgrade-timeout", "5s", "-control", sock}, loadtest.Config{})
	old := h.PID()

	target := filepath.Join(t.TempDir(), "precious")
	require.NoError(t, os.WriteFile(target, []byte("not yours\n"), 0o644))
	require.NoError(t, os.Chmod(target, 0o644)) // whatever the umask
	require.NoError(t, os.Remove(sock))
	require.NoError(t, os.Symlink(target, sock))

	a := h.upgradeViaAPI()
	assert.Equal(t, old, a.pid)
	assert.Contains(t, a.err, "exit status 1", "the new process refused to start")

	fi, err := os.Stat(target)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o644), fi.Mode().Perm(), "the link's target keeps its mode")
	fi, err = os.Lstat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.ModeSymlink, fi.Mode().Type(), "the failed process removed nothing")
	// The refusal is New's error, naming the path and what is wrong there.
	assert.Contains(t, h.logs.String(), "control socket "+sock+": is a symbolic link, not a socket")

	h.noChildren()
	h.waitPhase(old, graceful.PhaseServing)
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	assert.Equal(t, old, pidOf(t, c, "http://"+h.Addr+"/"), "the old process serves on")
	assert.Equal(t, old, loadtest.ReadPIDFile(h.PIDFile))
}
