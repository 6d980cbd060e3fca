package graceful_test

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"sort"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// fakeSystemd is a NOTIFY_SOCKET that records what the processes send.
type fakeSystemd struct {
	t    *testing.T
	conn *net.UnixConn
	path string
}

func newFakeSystemd(t *testing.T) *fakeSystemd {
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return &fakeSystemd{t: t, conn: conn, path: path}
}

var (
	monotonic = regexp.MustCompile(`MONOTONIC_USEC=[0-9]+`)
	extend    = regexp.MustCompile(`EXTEND_TIMEOUT_USEC=[0-9]+`)
)

// next returns the next datagram, with clock values replaced by N.
func (f *fakeSystemd) next() string {
	f.t.Helper()
	buf := make([]byte, 4096)
	f.conn.SetReadDeadline(time.Now().Add(15 * time.Second))
	n, err := f.conn.Read(buf)
	require.NoError(f.t, err, "no notification")
	s := monotonic.ReplaceAllString(string(buf[:n]), "MONOTONIC_USEC=N")
	return extend.ReplaceAllString(s, "EXTEND_TIMEOUT_USEC=N")
}

// TestSystemdNotify follows the datagrams a Type=notify-reload unit would
// get through a fresh start, a successful upgrade, a failed one and a
// SIGTERM drain.
func TestSystemdNotify(t *testing.T) {
	sd := newFakeSystemd(t)
	h := startHelper(t, []string{"-upgrade-timeout", "5s"}, loadtest.Config{Env: []string{"NOTIFY_SOCKET=" + sd.path}})
	a := h.PID()
	assert.Equal(t, fmt.Sprintf("READY=1\nSTATUS=serving (pid %d)", a), sd.next())

	u, err := h.Upgrade(context.Background(), 20*time.Second)
	require.NoError(t, err)
	b := u.NewPID
	assert.Equal(t, "RELOADING=1\nMONOTONIC_USEC=N\nSTATUS=upgrading: starting a new process", sd.next())
	// The successor and the old main process both name the new main PID,
	// in either order; the old one does not say STOPPING.
	got := []string{sd.next(), sd.next()}
	sort.Strings(got)
	assert.Equal(t, []string{
		fmt.Sprintf("MAINPID=%d\nREADY=1\nSTATUS=serving (pid %d, upgraded)", b, b),
		fmt.Sprintf("MAINPID=%d\nREADY=1\nSTATUS=upgraded to pid %d; pid %d draining", b, b, a),
	}, got)
	// Once the old one has exited, the status is the serving process's
	// own again, whichever of the two spoke last.
	assert.Equal(t, fmt.Sprintf("STATUS=serving (pid %d, upgraded)", b), sd.next())

	h.setMode(modeExit)
	require.NoError(t, h.Signal(syscall.SIGHUP))
	assert.Equal(t, "RELOADING=1\nMONOTONIC_USEC=N\nSTATUS=upgrading: starting a new process", sd.next())
	failed := sd.next()
	assert.Regexp(t, fmt.Sprintf(`^READY=1\nSTATUS=upgrade failed, still serving \(pid %d\): graceful: upgrade: child pid=[0-9]+ exited: exit status 3$`, b), failed)
	assert.Equal(t, b, loadtest.ReadPIDFile(h.PIDFile))

	require.NoError(t, h.Signal(syscall.SIGTERM))
	assert.Equal(t, fmt.Sprintf("STOPPING=1\nSTATUS=draining (pid %d)\nEXTEND_TIMEOUT_USEC=N", b), sd.next())
	code, err := h.WaitExit(context.Background(), b)
	require.NoError(t, err)
	assert.Equal(t, 0, code)
	// Nothing after STOPPING: every datagram was queued before the exit.
	sd.conn.SetReadDeadline(time.Now())
	_, err = sd.conn.Read(make([]byte, 4096))
	assert.Error(t, err, "no datagram after STOPPING=1")
}
