//go:build !linux

package loadtest

import "errors"

// BecomeSubreaper is only available on Linux: the harness collects the exit
// status of every server generation, which needs a subreaper.
func BecomeSubreaper() error {
	return errors.New("loadtest: needs Linux (PR_SET_CHILD_SUBREAPER)")
}

// Children is not implemented outside Linux.
func Children(pid int) []int { return nil }

// Alive is not implemented outside Linux.
func Alive(pid int) bool { return false }

// ProcStatus is not implemented outside Linux.
func ProcStatus(pid int, field string) int64 { return 0 }

func OpenFDs(pid int) int { return -1 }

// WatchPeakRSS is not implemented outside Linux: the peak is 0.
func WatchPeakRSS(pid int) func() int64 { return func() int64 { return 0 } }
