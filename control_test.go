//go:build linux

package graceful_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/control"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// rawControl sends req as is on the control socket and returns the answer.
func rawControl(t *testing.T, path, req string) string {
	t.Helper()
	conn, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	_, err = io.WriteString(conn, req)
	require.NoError(t, err)
	conn.(*net.UnixConn).CloseWrite()
	b, err := io.ReadAll(conn)
	require.NoError(t, err)
	return string(b)
}

// TestControlSocket drives the control socket the way systemd's
// ExecReload= does: a crashing new binary is reported with its reason while
// the old process serves on, a good one is reported once ready, and peers
// that are not the owner or send garbage get an error and change nothing.
func TestControlSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "control.sock")
	h := startHelper(t, []string{"-upgrade-timeout", "3s", "-control", sock}, loadtest.Config{})
	old := h.PID()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	fi, err := os.Stat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "control socket is owner-only")

	msg, err := control.Status(ctx, sock)
	require.NoError(t, err)
	assert.Equal(t, "pid "+strconv.Itoa(old)+" serving", msg)

	t.Run("garbage", func(t *testing.T) {
		assert.Contains(t, rawControl(t, sock, "\x00\xffreboot now\n"), `error graceful: control socket: unknown command "\x00\xffreboot now"`)
		assert.Contains(t, rawControl(t, sock, strings.Repeat("upgrade", 100)), "error graceful: control socket: request longer than 256 bytes")
		// At most 256 bytes, the newline included (issue 20).
		assert.Contains(t, rawControl(t, sock, strings.Repeat("s", 256)+"\n"), "error graceful: control socket: request longer than 256 bytes")
		assert.Contains(t, rawControl(t, sock, strings.Repeat("s", 255)+"\n"), `error graceful: control socket: unknown command "sss`)
		assert.Contains(t, rawControl(t, sock, "upgrade"), "error graceful: control socket: no request line", "a request must end with a newline")
		assert.Contains(t, rawControl(t, sock, "\n"), `unknown command ""`)
		assert.Contains(t, rawControl(t, sock, "UPGRADE\n"), `unknown command "UPGRADE" (want "upgrade", "status" or "status-json")`)
	})

	t.Run("not the owner", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root to run a client as another user")
		}
		// Let uid 65534 reach the socket and run a copy of the test binary.
		for d := filepath.Dir(sock); d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
			require.NoError(t, os.Chmod(d, 0o755))
		}
		asNobody := func() (string, error) {
			cmd := exec.Command(h.bin, "-test.run=^$")
			cmd.Env = append(os.Environ(), "GRACEFUL_TEST_CONTROL_CLIENT="+sock)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		out, err := asNobody()
		assert.Error(t, err)
		assert.Contains(t, out, "permission denied", "mode 0600 keeps other users out")
		// Even when the file mode lets them in, the peer check refuses.
		require.NoError(t, os.Chmod(sock, 0o666))
		out, err = asNobody()
		assert.Error(t, err)
		assert.Contains(t, out, "permission denied: peer uid 65534 is not the owner (uid 0)")
		require.NoError(t, os.Chmod(sock, 0o600))
	})

	// Nothing above started an upgrade: no new process was executed, and
	// the old one still serves, not upgrading.
	assert.Equal(t, []int{old}, h.pidsWith(evStarted))
	assert.Empty(t, loadtest.Children(old))
	assert.Equal(t, old, loadtest.ReadPIDFile(h.PIDFile))
	msg, err = control.Status(ctx, sock)
	require.NoError(t, err)
	assert.Equal(t, "pid "+strconv.Itoa(old)+" serving", msg)

	t.Run("crashing new binary", func(t *testing.T) {
		load := loadtest.StartLoad(h.Addr, loadtest.Mix{KeepAliveGET: 2, KeepAlivePOST: 2, FreshGET: 1, Pause: 5 * time.Millisecond})
		h.setMode(modeExit)
		_, err := control.Upgrade(ctx, sock)
		stats := load.Stop()
		require.Error(t, err)
		assert.Contains(t, err.Error(), "exit status 3", "the reason reaches the caller")
		assert.Equal(t, old, loadtest.ReadPIDFile(h.PIDFile))
		h.noChildren()
		assert.Zero(t, stats.Failed())
		assert.Greater(t, stats.Requests, 0)
		msg, err := control.Status(ctx, sock)
		require.NoError(t, err)
		assert.Equal(t, "pid "+strconv.Itoa(old)+" serving", msg, "the old process still serves")
	})

	t.Run("good upgrade", func(t *testing.T) {
		h.setMode(modeOK)
		load := loadtest.StartLoad(h.Addr, loadtest.Mix{KeepAliveGET: 2, KeepAlivePOST: 2, FreshGET: 1, Pause: 5 * time.Millisecond})
		msg, err := control.Upgrade(ctx, sock)
		require.NoError(t, err)
		successor := loadtest.ReadPIDFile(h.PIDFile)
		assert.NotEqual(t, old, successor)
		assert.Contains(t, msg, fmt.Sprintf("upgraded: pid %d ready after", successor))
		code, err := h.WaitExit(ctx, old)
		require.NoError(t, err)
		assert.Equal(t, 0, code)
		stats := load.Stop()
		assert.Zero(t, stats.Failed())
		h.Follow()

		// The successor inherited the socket: same path, same mode.
		fi, err := os.Stat(sock)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
		msg, err = control.Status(ctx, sock)
		require.NoError(t, err)
		assert.Equal(t, "pid "+strconv.Itoa(successor)+" serving", msg)
	})

	// A drain without successor removes the socket file.
	code, err := h.Stop(ctx, 10*time.Second)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	_, err = os.Stat(sock)
	assert.ErrorIs(t, err, os.ErrNotExist)
	_, err = control.Status(ctx, sock)
	assert.ErrorContains(t, err, "control: dial unix")
}
