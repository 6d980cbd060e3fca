//go:build unix

package graceful

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// readState maps the state file the previous process passed and parses
// it: whole and valid, or not at all (the error says why). The mapping is
// private (copy-on-write): the payloads are this process's to modify, and
// they stay mapped for its life, as a heap copy would stay allocated.
func readState(f *os.File, limit int64) (map[string]statePayload, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := fi.Size()
	if size > limit {
		return nil, fmt.Errorf("state of %d bytes is over the limit of %d (Options.MaxStateSize)", size, limit)
	}
	if size == 0 {
		return nil, fmt.Errorf("empty state file")
	}
	b, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		return nil, fmt.Errorf("mapping the state: %w", err)
	}
	got, err := parseState(b)
	if err != nil {
		unix.Munmap(b)
		return nil, err
	}
	return got, nil
}
