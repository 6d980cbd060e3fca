package main

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"

	"github.com/graceful-go/graceful/control"
)

// deploy installs newBinary at the running binary's path (the previous one
// kept beside it as PATH.previous) and upgrades to it; if the upgrade
// fails, the previous binary is put back before it returns the error, so
// that no restart ever starts the refused version.
func deploy(ctx context.Context, socket, newBinary string) (string, error) {
	path, err := runningPath(ctx, socket)
	if err != nil {
		return "", err
	}
	if err := checkExecutable(newBinary); err != nil {
		return "", err
	}
	tmp, err := copyBeside(newBinary, path)
	if err != nil {
		return "", err
	}
	return install(ctx, socket, path, tmp)
}

// rollback reinstates PATH.previous and upgrades to it; the binary it
// replaces becomes PATH.previous, and comes back if the upgrade fails.
func rollback(ctx context.Context, socket string) (string, error) {
	path, err := runningPath(ctx, socket)
	if err != nil {
		return "", err
	}
	prev := path + ".previous"
	if err := checkExecutable(prev); err != nil {
		return "", fmt.Errorf("nothing to roll back to: %w", err)
	}
	tmp := tmpName(path, "rollback")
	if err := os.Link(prev, tmp); err != nil {
		return "", fmt.Errorf("rollback: %w", err)
	}
	return install(ctx, socket, path, tmp)
}

// install puts tmp (a file in path's directory) at path, keeping what was
// there as path.previous, and upgrades; on failure it puts the previous
// binary back.
func install(ctx context.Context, socket, path, tmp string) (string, error) {
	prev := path + ".previous"
	keep := tmpName(path, "previous")
	if err := os.Link(path, keep); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("keeping the running binary: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		os.Remove(keep)
		return "", fmt.Errorf("installing at %s: %w", path, err)
	}
	if err := os.Rename(keep, prev); err != nil {
		os.Remove(keep)
		return "", restore(path, prev, fmt.Errorf("keeping the running binary as %s: %w", prev, err))
	}
	msg, err := control.Upgrade(ctx, socket)
	if err != nil {
		return "", restore(path, prev, err)
	}
	return msg + "; previous binary kept as " + prev, nil
}

// restore puts prev back at path after cause, and says so.
func restore(path, prev string, cause error) error {
	tmp := tmpName(path, "restore")
	err := os.Link(prev, tmp)
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("%w; and putting the previous binary back at %s failed: %v (it is at %s)", cause, path, err, prev)
	}
	return fmt.Errorf("%w; the previous binary is back at %s", cause, path)
}

// runningPath asks the server which file its upgrades start.
func runningPath(ctx context.Context, socket string) (string, error) {
	st, err := control.Details(ctx, socket)
	if err != nil {
		return "", err
	}
	if st.Executable == "" {
		return "", errors.New("the server does not say which file it runs (an older version?)")
	}
	fi, err := os.Lstat(st.Executable)
	if err != nil {
		return "", fmt.Errorf("the running binary: %w", err)
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		return "", fmt.Errorf("the running binary %s is a symbolic link: deploy replaces files; switch the link yourself", st.Executable)
	}
	return st.Executable, nil
}

// checkExecutable refuses what the server could not start: a missing or
// non-regular file, one without execute permission, or one that is neither
// an ELF binary for this machine nor a script.
func checkExecutable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	if fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not executable (mode %v)", path, fi.Mode().Perm())
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	head := make([]byte, 4)
	if _, err := io.ReadFull(f, head); err != nil {
		return fmt.Errorf("%s is too short to be a program", path)
	}
	if bytes.HasPrefix(head, []byte("#!")) {
		return nil
	}
	ef, err := elf.NewFile(f)
	if err != nil {
		return fmt.Errorf("%s is not a program for %s/%s: %v", path, runtime.GOOS, runtime.GOARCH, err)
	}
	if want, ok := machines[runtime.GOARCH]; ok && ef.Machine != want {
		return fmt.Errorf("%s is built for %v, not %s", path, ef.Machine, runtime.GOARCH)
	}
	return nil
}

var machines = map[string]elf.Machine{
	"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64, "386": elf.EM_386, "arm": elf.EM_ARM,
	"riscv64": elf.EM_RISCV, "ppc64le": elf.EM_PPC64, "s390x": elf.EM_S390, "loong64": elf.EM_LOONGARCH,
}

// copyBeside copies src into a new file in dst's directory, executable,
// flushed to disk, and returns its name.
func copyBeside(src, dst string) (string, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	tmp := tmpName(dst, "deploy")
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return "", fmt.Errorf("copying next to %s: %w", dst, err)
	}
	_, err = io.Copy(out, in)
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("copying next to %s: %w", dst, err)
	}
	return tmp, nil
}

// tmpName is a name in path's directory for a file on its way there.
func tmpName(path, what string) string {
	return filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+"."+what+"-"+strconv.Itoa(os.Getpid()))
}
