package graceful

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// stateFile makes the file the state travels in: a memfd, in memory, never
// on disk, close-on-exec.
func stateFile() (*os.File, error) { return memFile("graceful-state") }

// memFile makes a memfd named name (as /proc shows it).
func memFile(name string) (*os.File, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, os.NewSyscallError("memfd_create", err)
	}
	return os.NewFile(uintptr(fd), name), nil
}

// stateSeals make the state file immutable: once the new process has
// mapped it, nobody can shrink it under the mapping (SIGBUS) or change
// what it reads.
const stateSeals = unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE | unix.F_SEAL_SEAL

// sealState seals the written state file.
func sealState(f *os.File) error {
	_, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, stateSeals)
	return os.NewSyscallError("fcntl F_ADD_SEALS", err)
}

// checkSealed refuses a state file that is not sealed.
func checkSealed(f *os.File) error {
	seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
	if err != nil || seals&stateSeals != stateSeals {
		return fmt.Errorf("state file not sealed (seals %#x, %v): refusing to map it", seals, err)
	}
	return nil
}
