//go:build linux

package graceful

import (
	"errors"
	"net"

	"golang.org/x/sys/unix"
)

const peerCredSupported = true

// peerCred returns the user and process ID of the peer of a Unix socket
// connection, as the kernel recorded them at connect time.
func peerCred(conn net.Conn) (uid, pid int, err error) {
	if tc, ok := conn.(*trackedConn); ok {
		conn = tc.Conn
	}
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return 0, 0, errors.New("not a Unix socket connection")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, 0, err
	}
	if serr != nil {
		return 0, 0, serr
	}
	return int(cred.Uid), int(cred.Pid), nil
}
