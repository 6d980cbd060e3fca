package graceful

import (
	"os"

	"golang.org/x/sys/unix"
)

// stateFile makes the file the state travels in: a memfd, in memory, never
// on disk, close-on-exec.
func stateFile() (*os.File, error) {
	fd, err := unix.MemfdCreate("graceful-state", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("memfd_create", err)
	}
	return os.NewFile(uintptr(fd), "graceful-state"), nil
}
