//go:build linux

package graceful_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// nextFrom returns the next datagram and the PID of its sender, which the
// kernel attaches as systemd's NotifyAccess check sees it.
// Call passCred first: a datagram that arrived before carries none.
func (f *fakeSystemd) nextFrom() (string, int) {
	f.t.Helper()
	buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(unix.SizeofUcred))
	f.conn.SetReadDeadline(time.Now().Add(15 * time.Second))
	n, oobn, _, _, err := f.conn.ReadMsgUnix(buf, oob)
	require.NoError(f.t, err, "no notification")
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	require.NoError(f.t, err)
	require.Len(f.t, msgs, 1)
	cred, err := unix.ParseUnixCredentials(&msgs[0])
	require.NoError(f.t, err)
	return string(buf[:n]), int(cred.Pid)
}

// passCred makes the kernel attach its sender's credentials to every
// datagram that arrives from now on.
func (f *fakeSystemd) passCred() {
	f.t.Helper()
	raw, err := f.conn.SyscallConn()
	require.NoError(f.t, err)
	require.NoError(f.t, raw.Control(func(fd uintptr) {
		require.NoError(f.t, unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1))
	}))
}

// TestSystemdWatchdog runs under WATCHDOG_USEC: the main process pings,
// and after an upgrade its successor, now the main PID, takes over.
func TestSystemdWatchdog(t *testing.T) {
	sd := newFakeSystemd(t)
	sd.passCred() // the first ping comes as the process becomes ready
	h := startHelper(t, []string{"-upgrade-timeout", "5s"}, loadtest.Config{
		Env: []string{"NOTIFY_SOCKET=" + sd.path, "WATCHDOG_USEC=100000"},
		// systemd names the main process in WATCHDOG_PID.
		Prefix: []string{"sh", "-c", `WATCHDOG_PID=$$ exec "$0" "$@"`},
	})
	a := h.PID()
	// waitPing reads (bounded) until a WATCHDOG=1 from pid arrives.
	waitPing := func(pid int) {
		t.Helper()
		for range 100 {
			msg, from := sd.nextFrom()
			if msg == "WATCHDOG=1" {
				if from == pid {
					return
				}
				require.Contains(t, []int{a, pid}, from, "ping from an unknown process")
			}
		}
		t.Fatalf("no WATCHDOG=1 from pid %d in 100 datagrams", pid)
	}
	waitPing(a)
	u, err := h.Upgrade(context.Background(), 20*time.Second)
	require.NoError(t, err)
	waitPing(u.NewPID)
}
