//go:build unix

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// lock takes the lock on deploys and rollbacks of path: flock(2) on the
// file .NAME.deploy-lock beside it (created mode 0600; anything but a
// regular file is refused). The kernel releases it when the process ends,
// however it ends, so a killed gracefulctl leaves no lock behind and a PID
// reused by another process means nothing. It waits while another process
// holds it, saying so once (with the holder's PID, which each holder
// writes into the file for information), until ctx ends; then it returns
// an error saying nothing changed. unlock empties the file and releases
// the lock.
//
// The file is never removed: unlinking a flocked file lets a process that
// opened the old name lock one inode while the next one locks a new file
// (both would hold "the lock"). For the same reason a lock taken on a file
// that no longer is the one at the name (removed by hand) is dropped and
// taken again.
func lock(ctx context.Context, path string, stderr io.Writer) (unlock func(), err error) {
	name := lockName(path)
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	said := false
	for {
		f, err := openLock(name)
		if err != nil {
			return nil, fmt.Errorf("locking deploys of %s: %w", path, err)
		}
		held, err := tryFlock(f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("locking deploys of %s: flock %s: %w", path, name, err)
		}
		if held && isAt(f, name) {
			f.Truncate(0)
			f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0) // for information only
			return func() {
				f.Truncate(0) // while still held: the next holder's PID is never erased
				f.Close()     // releases the lock
			}, nil
		}
		holder := "another process"
		if !held {
			if pid := lockHolder(f); pid > 0 {
				holder = "pid " + strconv.Itoa(pid)
			}
		}
		f.Close()
		if !held && !said {
			fmt.Fprintf(stderr, "gracefulctl: waiting for %s's deploy or rollback of %s to end (lock %s)\n", holder, path, name)
			said = true
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w while waiting for %s's deploy or rollback of %s to end (lock %s); nothing changed", context.Cause(ctx), holder, path, name)
		case <-t.C:
		}
	}
}

// openLock opens (creating it) the lock file name, refusing anything but a
// regular file; links are not followed, and opening never blocks.
func openLock(name string) (*os.File, error) {
	if fi, err := os.Lstat(name); err == nil && !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("the lock file %s is %s, not a regular file", name, fileKind(fi))
	}
	fd, err := unix.Open(name, unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0o600)
	if errors.Is(err, unix.ELOOP) {
		return nil, fmt.Errorf("the lock file %s is a symbolic link, not a regular file", name)
	}
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: name, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "fstat", Path: name, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG { // put there since the Lstat
		unix.Close(fd)
		return nil, fmt.Errorf("the lock file %s is not a regular file", name)
	}
	unix.SetNonblock(fd, false) // a regular file: an ordinary *os.File
	f := os.NewFile(uintptr(fd), name)
	return f, nil
}

// tryFlock takes an exclusive flock on f without waiting: false if another
// open file holds one.
func tryFlock(f *os.File) (bool, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return false, err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) {
		for {
			ferr = unix.Flock(int(fd), unix.LOCK_EX|unix.LOCK_NB)
			if ferr != unix.EINTR {
				return
			}
		}
	}); err != nil {
		return false, err
	}
	if errors.Is(ferr, unix.EWOULDBLOCK) {
		return false, nil
	}
	return ferr == nil, ferr
}

// isAt reports whether f is still the file at name.
func isAt(f *os.File, name string) bool {
	fi, err := f.Stat()
	if err != nil {
		return false
	}
	ni, err := os.Lstat(name)
	return err == nil && os.SameFile(fi, ni)
}

// lockHolder is the PID the holder of the lock file f wrote into it, or 0.
func lockHolder(f *os.File) int {
	b := make([]byte, 32)
	n, _ := f.ReadAt(b, 0)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b[:n])))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}
