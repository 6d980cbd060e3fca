//go:build linux

package graceful

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"

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

// chmodSocket gives the socket file at path the permission bits perm,
// never following a link there: whoever can write to the socket's directory
// can replace the file between our bind and our chmod, or across an
// upgrade, and chmod(2) would change the mode of the link's target. The
// file is opened without following links (O_PATH|O_NOFOLLOW opens a link
// itself), checked to be a socket through that descriptor, and changed
// through /proc/self/fd, which reaches the opened inode, never a link's
// target. A file that already has perm (an inherited socket) is left as is.
func chmodSocket(path string, perm os.FileMode) error {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open without following links: %w", err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fstat: %w", err)
	}
	if typ := st.Mode & unix.S_IFMT; typ != unix.S_IFSOCK {
		return fmt.Errorf("is %s, not a socket; refusing to change its mode", fileType(typ))
	}
	if st.Mode&0o7777 == uint32(perm.Perm()) {
		return nil
	}
	if err := unix.Chmod("/proc/self/fd/"+strconv.Itoa(fd), uint32(perm.Perm())); err != nil {
		return fmt.Errorf("chmod through /proc/self/fd: %w", err)
	}
	return nil
}

// fileType names a file type (a stat mode masked with S_IFMT).
func fileType(typ uint32) string {
	switch typ {
	case unix.S_IFLNK:
		return "a symbolic link"
	case unix.S_IFREG:
		return "a regular file"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFIFO:
		return "a named pipe"
	case unix.S_IFCHR, unix.S_IFBLK:
		return "a device"
	}
	return fmt.Sprintf("a file of type %#o", typ)
}
