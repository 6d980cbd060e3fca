//go:build linux

package supervisor

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// noTrampolineEnv makes the test binary, started as the warden, behave as
// a binary whose main does not call Trampoline: it runs on (a server).
const noTrampolineEnv = "GRACEFUL_SUPERVISOR_TEST_NO_TRAMPOLINE"

func TestMain(m *testing.M) {
	if os.Getenv(wardenEnv) == "1" && os.Getenv(noTrampolineEnv) == "1" {
		time.Sleep(2 * time.Minute) // killed by Run long before
		os.Exit(3)
	}
	Trampoline()
	os.Exit(m.Run())
}

// TestRunWithoutTrampoline (review item 2): Run refuses to start the
// server when its own binary, started as the warden, does not run the
// warden's code (an embedding main that does not call Trampoline first):
// the binary never answers, is killed, and Run returns an error naming
// Trampoline, the server never started.
func TestRunWithoutTrampoline(t *testing.T) {
	t.Setenv(noTrampolineEnv, "1")
	defer func(d time.Duration) { wardenAnswer = d }(wardenAnswer)
	wardenAnswer = 2 * time.Second
	marker := filepath.Join(t.TempDir(), "started")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	code, err := Run(ctx, Config{Command: []string{"sh", "-c", `touch "$0"`, marker}})
	if err == nil || !strings.Contains(err.Error(), "Trampoline") {
		t.Fatalf("Run: %d, %v; want an error naming Trampoline", code, err)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Error("the server was started")
	}
	// The binary started as the warden was killed and reaped: no child left.
	paths, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, p := range paths {
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if st, ok := procStat(pid); ok && st.ppid == os.Getpid() {
			t.Errorf("a child is left: pid %d (%s)", pid, st.state)
		}
	}
	t.Log(err)
}

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
