//go:build unix

package graceful

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// readState maps the state file the previous process passed and parses
// it: whole and valid, or not at all (the error says why). The mapping is
// private (copy-on-write), and stays until ReleaseState.
func readState(f *os.File, limit int64) (map[string]statePayload, []byte, error) {
	if err := checkSealed(f); err != nil {
		return nil, nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	size := fi.Size()
	if size > limit+maxStateFraming {
		return nil, nil, fmt.Errorf("state file of %d bytes is over the limit of %d (Options.MaxStateSize)", size, limit)
	}
	if size == 0 {
		return nil, nil, fmt.Errorf("empty state file")
	}
	b, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		return nil, nil, fmt.Errorf("mapping the state: %w", err)
	}
	got, err := parseState(b)
	if err == nil {
		var total int64
		for _, pl := range got {
			total += int64(len(pl.data))
		}
		if total > limit {
			err = fmt.Errorf("state of %d bytes is over the limit of %d (Options.MaxStateSize)", total, limit)
		}
	}
	if err != nil {
		unix.Munmap(b)
		return nil, nil, err
	}
	return got, b, nil
}

func unmapState(b []byte) { unix.Munmap(b) }
