package graceful

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// checkDir fails when the directory that will hold path is missing or not
// writable, so New reports it instead of a failure after start-up.
func checkDir(what, path string) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".graceful-check-*")
	if err != nil {
		return fmt.Errorf("graceful: %s directory %s is not writable: %w", what, dir, err)
	}
	name := f.Name()
	f.Close()
	os.Remove(name)
	return nil
}

// writePIDFile replaces path atomically, so a reader never sees a partial
// or empty file.
func writePIDFile(path string) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("graceful: write PID file: %w", err)
	}
	defer os.Remove(f.Name())
	_, err = f.WriteString(strconv.Itoa(os.Getpid()) + "\n")
	if err == nil {
		err = f.Chmod(0o644)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("graceful: write PID file: %w", err)
	}
	return nil
}

// successorPID is the PID the PID file names once a successor is ready, or
// 0 without a PID file.
func (p *Process) successorPID() int {
	if p.opts.PIDFile == "" {
		return 0
	}
	if pid := readPIDFile(p.opts.PIDFile); pid != os.Getpid() {
		return pid
	}
	return 0
}

// readPIDFile returns the PID that path names, or 0.
func readPIDFile(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0
	}
	return pid
}

// removePIDFile removes path only while it still names this process.
func removePIDFile(path string) {
	if readPIDFile(path) == os.Getpid() {
		os.Remove(path)
	}
}
