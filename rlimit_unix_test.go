//go:build unix

package graceful_test

import "syscall"

// setNofile lowers this process's descriptor limit to n.
func setNofile(n uint64) error {
	return syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: n, Max: n})
}
