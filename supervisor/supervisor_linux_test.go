//go:build linux

package supervisor

import (
	"log/slog"
	"os"
	"os/exec"
	"testing"
)

// TestStaleGeneration (review item 5): a generation the supervisor knows
// whose PID now names another process (it exited, reaped by its parent,
// and the PID was reused) is neither waited for as a draining generation
// nor trusted on the notify socket. The reused PID is played by a real
// process whose start time differs from the one recorded.
func TestStaleGeneration(t *testing.T) {
	if !procMatches() {
		t.Skip("needs /proc of this PID namespace")
	}
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		other.Process.Kill()
		other.Wait()
	}()
	pid := other.Process.Pid
	st, ok := procStat(pid)
	if !ok || st.start == 0 {
		t.Fatalf("no start time for pid %d: %+v", pid, st)
	}
	newSupervision := func(start uint64) *supervision {
		return &supervision{
			log:  slog.New(slog.DiscardHandler),
			gens: map[int]*generation{pid: {start: start}, os.Getpid(): newGeneration(os.Getpid())},
			uids: map[uint32]bool{uint32(os.Geteuid()): true},
			main: os.Getpid(),
		}
	}

	// The process itself: a generation still draining.
	s := newSupervision(st.start)
	if got := s.draining(); len(got) != 1 || got[0] != pid {
		t.Errorf("draining: %v, want [%d]", got, pid)
	}
	if !s.fromService(pid, 65534) {
		t.Error("a datagram from a known generation is dropped")
	}

	// Another process with its PID.
	s = newSupervision(st.start - 1)
	if got := s.draining(); len(got) != 0 {
		t.Errorf("draining: %v: a reused PID is waited for as a generation", got)
	}
	s = newSupervision(st.start - 1)
	if s.fromService(pid, 65534) {
		t.Error("a datagram from a reused PID, as another user, passes for the service")
	}
	if _, known := s.gens[pid]; known {
		t.Error("the stale generation is not forgotten")
	}
	if s.uids[65534] {
		t.Error("the reused PID's user is trusted")
	}
}
