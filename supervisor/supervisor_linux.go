//go:build linux

package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// trampolineEnv marks the supervisor's own binary started to exec the
// server with LISTEN_PID naming it (see Trampoline).
const trampolineEnv = "GRACEFUL_SUPERVISE_EXEC"

// wardenEnv marks the supervisor's own binary started as its warden (see
// warden).
const wardenEnv = "GRACEFUL_SUPERVISE_WARDEN"

// forwarded are the signals passed on to the current generation.
var forwarded = []os.Signal{unix.SIGHUP, unix.SIGTERM, unix.SIGINT, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2}

const (
	// successorGrace is how long, after the main process exited, a live
	// child that is no known generation has to announce itself as the next
	// one.
	successorGrace = 2 * time.Second
	// adoptGrace is how long, after a server command exited 0 before it was
	// ready while leaving processes behind, one of them has to declare
	// itself ready (READY=1) to be followed as the server.
	adoptGrace = 60 * time.Second
	// drainWait bounds the wait for an older generation still draining
	// when the serving one exited without a successor, unless it announced
	// its own bound (EXTEND_TIMEOUT_USEC=).
	drainWait = 90 * time.Second
	// wardenKillAfter is how long the warden waits, after SIGTERM, for what
	// is left of the server before SIGKILL.
	wardenKillAfter = 90 * time.Second
	// maxSyncRead bounds the datagrams read for one sync.
	maxSyncRead = 4096
)

// Trampoline, called first in the supervisor's main, runs what Run starts
// of the supervisor's own binary, and otherwise returns at once: the
// warden, which ends what is left of the server when the supervisor is
// gone (even killed by SIGKILL), and the exec of the server with LISTEN_PID
// naming it (socket activation needs LISTEN_PID to name the server's own
// PID, which is known only in the process that becomes the server). Run
// refuses to start when its own binary does not call it: the warden it
// starts must answer before the server is started.
func Trampoline() {
	if os.Getenv(wardenEnv) == "1" {
		os.Exit(warden(os.NewFile(3, "supervisor"), os.NewFile(4, "supervisor-ack")))
	}
	if os.Getenv(trampolineEnv) != "1" {
		return
	}
	os.Unsetenv(trampolineEnv)
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "supervisor: trampoline without a command")
		os.Exit(127)
	}
	path, err := exec.LookPath(os.Args[1])
	if err == nil {
		os.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
		err = syscall.Exec(path, os.Args[1:], os.Environ())
	}
	fmt.Fprintf(os.Stderr, "supervisor: cannot start %s: %v\n", os.Args[1], err)
	os.Exit(127)
}

// wardenIgnores are the signals the warden ignores: a terminal's are the
// supervisor's to handle, a service manager's stop (systemd's
// KillMode=control-group sends SIGTERM to every process of the service)
// must not end the warden before the server, and its own SIGTERM to its
// process group reaches it too. It acts only when its pipe ends.
var wardenIgnores = []os.Signal{unix.SIGHUP, unix.SIGINT, unix.SIGQUIT, unix.SIGTERM, unix.SIGUSR1, unix.SIGUSR2, unix.SIGPIPE}

// warden runs in a process group of its own, which the first generation
// joins (and every later one inherits): the group's number is the
// warden's PID, so it cannot name another group while the warden lives.
// It tells the supervisor it runs (a byte on ack), then waits for the end
// of a pipe whose write end only the supervisor holds, which comes when
// Run returns or the supervisor dies however it dies. Whatever is then
// left of the group is sent SIGTERM, so that it drains as at a stop and
// releases its sockets, and SIGKILL wardenKillAfter later. Parent-death
// signals cannot do this: every generation after the first is its
// predecessor's child.
func warden(pipe, ack *os.File) int {
	signal.Ignore(wardenIgnores...)
	ack.Write([]byte{1})
	ack.Close()
	b, _ := io.ReadAll(io.LimitReader(pipe, 64))
	pipe.Close()
	self := os.Getpid()
	if len(b) == 0 || procMatches() && len(groupMembers(self)) == 0 {
		return 0 // no server started, or nothing left of it
	}
	fmt.Fprintf(os.Stderr, "supervisor: the supervisor is gone; sending SIGTERM to what is left of the server (process group %d)\n", self)
	unix.Kill(-self, unix.SIGTERM) // ignored here
	for deadline := time.Now().Add(wardenKillAfter); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		// Without a /proc of this PID namespace the warden cannot tell
		// its group's other members from itself: it waits the whole time.
		if procMatches() && len(groupMembers(self)) == 0 {
			return 0
		}
	}
	fmt.Fprintf(os.Stderr, "supervisor: process group %d still runs %v after SIGTERM; sending SIGKILL\n", self, wardenKillAfter)
	unix.Kill(-self, unix.SIGKILL) // the warden too: its last act
	return 0
}

// groupMembers returns the live processes of process group pgid but the
// caller.
func groupMembers(pgid int) []int {
	paths, _ := filepath.Glob("/proc/[0-9]*/stat")
	var out []int
	for _, p := range paths {
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if st, ok := procStat(pid); ok && st.pgrp == pgid && st.state != "Z" && pid != os.Getpid() {
			out = append(out, pid)
		}
	}
	return out
}

// wardenAnswer bounds the wait for the warden's first byte (a variable
// for tests).
var wardenAnswer = 30 * time.Second

// startWarden starts the warden and returns the pipe's write end, on which
// the supervisor writes once the server is started, and the warden's PID,
// which is also its process group's number: the server's. It returns once
// the warden runs its code, signals ignored; a binary that does not call
// Trampoline first never answers, and is killed.
func startWarden(stderr io.Writer) (*os.File, int, error) {
	self := "/proc/self/exe" // even when the binary has been replaced on disk
	if _, err := os.Stat(self); err != nil {
		if self, err = os.Executable(); err != nil {
			return nil, 0, fmt.Errorf("supervisor: starting the warden: %w", err)
		}
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, 0, fmt.Errorf("supervisor: starting the warden: %w", err)
	}
	defer r.Close()
	ackR, ackW, err := os.Pipe()
	if err != nil {
		w.Close()
		return nil, 0, fmt.Errorf("supervisor: starting the warden: %w", err)
	}
	defer ackR.Close()
	cmd := exec.Command(self)
	cmd.Args = []string{os.Args[0]}
	cmd.Env = append(os.Environ(), wardenEnv+"=1")
	cmd.ExtraFiles = []*os.File{r, ackW}
	if f, ok := stderr.(*os.File); ok {
		cmd.Stderr = f // not through a copying goroutine, which dies with us
	}
	// A process group of its own, out of the terminal's: the server's.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	ackW.Close()
	if err != nil {
		w.Close()
		return nil, 0, fmt.Errorf("supervisor: starting the warden: %w", err)
	}
	pid := cmd.Process.Pid
	ackR.SetReadDeadline(time.Now().Add(wardenAnswer))
	if _, err := io.ReadFull(ackR, make([]byte, 1)); err != nil {
		w.Close()
		cmd.Process.Kill()
		cmd.Wait()
		exe, _ := os.Executable()
		return nil, 0, fmt.Errorf("supervisor: this binary (%s), started again as the warden, did not answer: its main must call supervisor.Trampoline first: %w", exe, err)
	}
	cmd.Process.Release() // reaped with every other child
	return w, pid, nil
}

// message is one notify datagram from the service, or a sync's end.
type message struct {
	pid    int // the sender
	fields map[string]string
	lines  []string
	synced bool   // every datagram queued when sync returned seq is before it
	seq    uint64 // of a synced message
}

// phase is where the supervisor is in the service's life:
//
//	running    -> ending      the main process exited
//	ending     -> running     a successor had announced itself
//	ending     -> successor   a live child that is no known generation may announce itself
//	ending     -> adopting    the command exited 0 before it was ready, leaving children
//	ending     -> draining    older generations still drain
//	successor  -> running     it announced itself
//	successor  -> draining    it did not, and older generations still drain
//	adopting   -> running     a child declared itself ready: it is followed
//	adopting   -> draining    none did, and older generations still drain
//	draining   -> running     a successor announced itself after all
//
// From ending, successor, adopting and draining, Run returns once nothing
// is left to wait for or the phase's bound passed.
type phase int

const (
	phaseRunning phase = iota
	phaseEnding
	phaseSuccessor
	phaseAdopting
	phaseDraining
)

func (p phase) String() string {
	return [...]string{"running", "ending", "successor", "adopting", "draining"}[p]
}

// checkGroup warns, once per generation, when the main process, ready,
// is not in the warden's process group: a server that detaches (setsid)
// is not stopped by the warden if the supervisor is killed.
func (s *supervision) checkGroup() {
	s.mu.Lock()
	g := s.gens[s.main]
	if g == nil || g.groupChecked {
		s.mu.Unlock()
		return
	}
	g.groupChecked = true
	s.mu.Unlock()
	if st, ok := procStat(s.main); ok && st.pgrp != s.warden {
		s.log.Warn("the server left the process group it was started in (it called setsid?): it is not stopped if the supervisor is killed; run it in the foreground", "pid", s.main, "group", st.pgrp, "server_group", s.warden)
	}
}

// generation is one generation of the server the supervisor knows. An
// older one is forgotten once it has exited: its PID may then name another
// process, which must not pass for the service.
type generation struct {
	start      uint64        // its start time (procInfo.start); 0 if unknown
	drainBound time.Duration // announced with EXTEND_TIMEOUT_USEC=; 0 if not
	// groupChecked is set once its process group was looked at.
	groupChecked bool
}

// newGeneration records pid as a generation.
func newGeneration(pid int) *generation {
	st, _ := procStat(pid)
	return &generation{start: st.start}
}

// reused reports whether pid, g's PID, now names another process than g.
func (g *generation) reused(pid int) bool {
	if g.start == 0 || !procMatches() {
		return false
	}
	st, ok := procStat(pid)
	return ok && st.start != g.start
}

// mainGone reports whether the main process, which may not be our child,
// has exited.
func (s *supervision) mainGone() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.gens[s.main]
	return gone(s.main) || g != nil && g.reused(s.main)
}

// stopOutsiders sends SIGTERM to those of pids, our children, that left
// the warden's process group (setsid), which the warden does not reach.
// Being our children, not reaped, their PIDs cannot name other processes.
func (s *supervision) stopOutsiders(pids []int) {
	for _, pid := range pids {
		if st, ok := procStat(pid); ok && st.ppid == os.Getpid() && st.pgrp != s.warden {
			s.log.Info("stopping a process outside the server's process group", "pid", pid, "group", st.pgrp)
			unix.Kill(pid, unix.SIGTERM)
		}
	}
}

// alive reports whether g, of PID pid, still runs.
func (g *generation) alive(pid int) bool {
	if procMatches() {
		return !gone(pid) && !g.reused(pid)
	}
	return unix.Kill(pid, 0) == nil
}

// supervision is the state of one Run, owned by its loop; only gens is
// also read by the notify reader, under mu.
type supervision struct {
	log    *slog.Logger
	notify func(...string)
	warden int

	mu   sync.Mutex
	gens map[int]*generation
	uids map[uint32]bool // ours, and every one a known generation sent as

	main      int
	phase     phase
	exitCode  int
	everReady bool // a main process said READY=1
	pending   []syscall.Signal
	deadline  <-chan time.Time // the current phase's bound
	readyLeft map[int]message  // READY=1 from descendants that were not the main process
	sync      func() uint64    // asks the reader for a synced message
	asked     uint64           // the last sync asked for
}

func run(ctx context.Context, cfg Config) (int, error) {
	log := cfg.Log
	if os.Getenv(wardenEnv) == "1" {
		return 0, errors.New("supervisor: this process was started as the supervisor's warden: its main must call supervisor.Trampoline first")
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return 0, fmt.Errorf("supervisor: becoming a child subreaper: %w", err)
	}
	// Nothing we were given leaks to the server but what command passes
	// on (socket-activated descriptors, by ExtraFiles).
	unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	// An abstract socket: nothing on disk to leave behind, even if we are
	// killed, and no writable directory needed. Anyone may send to it, so
	// the reader drops what does not come from the service.
	addr := &net.UnixAddr{Name: fmt.Sprintf("@graceful-supervisor-%d-%d", os.Getpid(), time.Now().UnixNano()), Net: "unixgram"}
	sock, err := net.ListenUnixgram("unixgram", addr)
	if err != nil {
		return 0, fmt.Errorf("supervisor: notify socket: %w", err)
	}
	defer sock.Close()
	raw, err := sock.SyscallConn()
	if err == nil {
		cerr := raw.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
		if err == nil {
			err = cerr
		}
	}
	if err != nil {
		return 0, fmt.Errorf("supervisor: notify socket credentials: %w", err)
	}

	sigs := make(chan os.Signal, 32)
	signal.Notify(sigs, append([]os.Signal{unix.SIGCHLD}, forwarded...)...)
	defer signal.Stop(sigs)

	// The warden first: once the server exists, nothing can end us without
	// the warden ending the server too.
	toWarden, wardenPID, err := startWarden(cfg.Stderr)
	if err != nil {
		return 0, err
	}
	defer toWarden.Close() // the warden ends what is left of the server

	cmd, err := command(cfg, addr.Name, wardenPID)
	if err != nil {
		return 0, err
	}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("supervisor: starting %s: %w", cfg.Command[0], err)
	}
	for _, f := range cmd.ExtraFiles {
		f.Close() // the server has them now
	}
	main := cmd.Process.Pid
	cmd.Process.Release() // reaped below, with every other child
	// In the warden's process group (Setpgid), as every later generation.
	if _, err := fmt.Fprintf(toWarden, "started %d\n", main); err != nil {
		log.Error("the warden is gone: the server would outlive a killed supervisor", "err", err)
	}
	log.Info("supervising", "pid", os.Getpid(), "server", main, "warden", wardenPID)
	if !procMatches() {
		log.Warn("/proc is not this PID namespace's (mount a /proc of its own): a generation that dies under its predecessor is not noticed")
	}

	relay := os.Getenv("NOTIFY_SOCKET") != ""
	s := &supervision{
		log:       log,
		warden:    wardenPID,
		gens:      map[int]*generation{main: newGeneration(main)},
		uids:      map[uint32]bool{uint32(os.Geteuid()): true},
		readyLeft: map[int]message{},
		main:      main,
		notify: func(lines ...string) {
			if relay {
				if _, err := daemon.SdNotify(false, strings.Join(lines, "\n")); err != nil {
					log.Warn("notify: relaying to the service manager failed", "err", err)
				}
			}
		},
	}
	r := &notifyReader{sock: sock, raw: raw, out: make(chan message, 64), syncs: make(chan struct{}, 1), stop: make(chan struct{}), fromService: s.fromService}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		r.run()
	}()
	defer func() {
		close(r.stop)
		sock.Close()
		<-readDone
	}()
	s.sync = r.sync
	return s.loop(ctx, sigs, r.out), nil
}

// loop follows the service until it has ended, and returns the exit code.
func (s *supervision) loop(ctx context.Context, sigs <-chan os.Signal, msgs <-chan message) int {
	check := time.NewTicker(200 * time.Millisecond)
	defer check.Stop()
	ctxDone := ctx.Done()
	for {
		select {
		case <-ctxDone:
			ctxDone = nil
			s.signal(unix.SIGTERM)
		case sig := <-sigs:
			if sig != unix.SIGCHLD {
				s.signal(sig.(syscall.Signal))
				continue
			}
			s.reap()
		case <-check.C:
			// A generation that is not our child (it was its
			// predecessor's, which reaps it) can die unseen by wait4.
			if s.phase == phaseRunning && s.mainGone() {
				s.log.Error("server exited; its status went to its parent", "pid", s.main)
				s.mainExited(1)
			}
		case <-s.deadline:
			switch s.phase {
			case phaseAdopting:
				left := s.strangers()
				s.log.Error("the server command exited 0 before it was ready, and nothing it left behind declared itself ready: the server forks into the background, and supervise needs it in the foreground (exec it); exiting 1, and what is left is stopped", "left", left)
				s.exitCode = 1
				s.stopOutsiders(left)
			case phaseDraining:
				s.log.Warn("an older generation still drains past its bound; exiting, and it is stopped", "pids", s.draining())
				return s.exitCode
			case phaseSuccessor:
				s.log.Info("no generation announced itself", "code", s.exitCode)
			}
			s.deadline = nil
			if s.finish() {
				return s.exitCode
			}
		case m := <-msgs:
			if m.synced {
				if m.seq < s.asked {
					continue // a later one answers the last request
				}
				if s.phase == phaseRunning {
					s.forward(s.main)
				} else if s.phase == phaseEnding && s.decide() {
					return s.exitCode
				}
				continue
			}
			s.handle(m)
		}
		if s.waitedEnough() {
			return s.exitCode
		}
	}
}

// signal passes sig on: to the current generation once every message it
// sent before is handled (a MAINPID= may name a newer one), or to the
// older generations still draining.
func (s *supervision) signal(sig syscall.Signal) {
	if stops[sig] || !slices.Contains(s.pending, sig) { // one reload is asked for once, however often
		s.pending = append(s.pending, sig)
	}
	switch s.phase {
	case phaseRunning:
		s.asked = s.sync()
	case phaseDraining, phaseSuccessor, phaseAdopting:
		// Whatever runs of the service is told of a stop: a stop is a
		// stop. Not of the rest, whose default action also terminates: a
		// successor or a process the command left behind may not handle
		// them yet. They wait for the next main process.
		if stops[sig] {
			s.forwardStops(append(s.liveChildren(), s.draining()...)...)
		}
	}
}

// stops are the signals that ask the service to stop.
var stops = map[syscall.Signal]bool{unix.SIGTERM: true, unix.SIGINT: true, unix.SIGQUIT: true}

// forward sends the pending signals to each of pids (once to each).
func (s *supervision) forward(pids ...int) {
	s.send(s.pending, pids)
	s.pending = nil
}

// forwardStops sends the pending stop signals to each of pids (once to
// each), and keeps the others pending.
func (s *supervision) forwardStops(pids ...int) {
	var send, keep []syscall.Signal
	for _, sig := range s.pending {
		if stops[sig] {
			send = append(send, sig)
		} else {
			keep = append(keep, sig)
		}
	}
	s.send(send, pids)
	s.pending = keep
}

func (s *supervision) send(sigs []syscall.Signal, pids []int) {
	seen := map[int]bool{}
	for _, pid := range pids {
		if seen[pid] {
			continue
		}
		seen[pid] = true
		for _, sig := range sigs {
			s.log.Info("forwarding signal", "signal", sig.String(), "to", pid)
			unix.Kill(pid, sig)
		}
	}
}

// reap reaps every child that exited.
func (s *supervision) reap() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
		if pid != s.main {
			s.mu.Lock()
			delete(s.gens, pid) // an older generation, reaped
			s.mu.Unlock()
		}
		if pid == s.warden {
			s.log.Error("the warden exited: the server would outlive a killed supervisor", "status", status(ws))
		}
		if pid == s.main && s.phase == phaseRunning {
			s.log.Info("server exited", "pid", pid, "code", status(ws))
			s.mainExited(status(ws))
		}
	}
}

// mainExited starts the end: what the service said before is read first,
// since a successor's MAINPID= may be among it.
func (s *supervision) mainExited(code int) {
	s.exitCode = code
	s.setPhase(phaseEnding)
	s.asked = s.sync()
}

// decide, once what the service said before its main process exited is
// handled, chooses what to wait for; it reports whether nothing is left.
func (s *supervision) decide() bool {
	if strangers := s.strangers(); len(strangers) > 0 {
		if !s.everReady && s.exitCode == 0 {
			s.log.Warn("the server command exited 0 before it was ready, leaving processes behind: following the one that declares itself ready", "left", strangers, "within", adoptGrace)
			s.setPhase(phaseAdopting)
			s.deadline = time.After(adoptGrace)
			for _, pid := range strangers {
				if m, ok := s.readyLeft[pid]; ok { // it spoke before the command exited
					s.handle(m)
					break
				}
			}
			return false
		}
		// A successor reparented to us may not have spoken yet (its
		// predecessor died before announcing it).
		s.setPhase(phaseSuccessor)
		s.deadline = time.After(successorGrace)
		return false
	}
	return s.finish()
}

// finish waits for older generations still draining, and reports whether
// none is left.
func (s *supervision) finish() bool {
	draining := s.draining()
	if len(draining) == 0 {
		return true
	}
	bound := time.Duration(0)
	s.mu.Lock()
	for _, pid := range draining {
		bound = max(bound, s.gens[pid].drainBound)
	}
	s.mu.Unlock()
	if bound == 0 {
		bound = drainWait
	}
	s.log.Info("the serving generation exited; waiting for older ones to finish their drain", "code", s.exitCode, "draining", draining, "at_most", bound)
	s.notify("STOPPING=1", fmt.Sprintf("STATUS=the server exited (code %d); waiting for pid %v to finish its drain", s.exitCode, draining),
		"EXTEND_TIMEOUT_USEC="+strconv.FormatInt(bound.Microseconds(), 10))
	s.setPhase(phaseDraining)
	s.deadline = time.After(bound)
	s.forwardStops(draining...)
	return false
}

// waitedEnough reports whether a waiting phase has nothing left to wait
// for.
func (s *supervision) waitedEnough() bool {
	switch s.phase {
	case phaseDraining:
		return len(s.draining()) == 0
	case phaseSuccessor, phaseAdopting:
		if len(s.strangers()) == 0 {
			s.deadline = nil
			return s.finish()
		}
	}
	return false
}

func (s *supervision) setPhase(p phase) {
	if p != s.phase {
		s.log.Debug("phase", "from", s.phase.String(), "to", p.String())
	}
	s.phase = p
}

// handle acts on one notify message from the service.
func (s *supervision) handle(m message) {
	s.mu.Lock()
	if g := s.gens[m.pid]; g != nil {
		if usec, err := strconv.ParseInt(m.fields["EXTEND_TIMEOUT_USEC"], 10, 64); err == nil && usec > 0 && m.fields["STOPPING"] == "1" {
			g.drainBound = time.Duration(usec) * time.Microsecond
		}
	}
	s.mu.Unlock()
	if v, ok := m.fields["MAINPID"]; ok {
		pid, err := strconv.Atoi(v)
		// From the current generation about its successor, or from a
		// successor about itself; either way a child of the current
		// generation, or of ours once its parent is gone.
		if err == nil && pid > 0 && pid != s.main && (m.pid == s.main || m.pid == pid) {
			if st, _ := procStat(pid); st.ppid == s.main || st.ppid == os.Getpid() || !procMatches() {
				s.follow(pid, "new generation")
			}
		}
	}
	if s.phase == phaseAdopting && m.pid != s.main && m.fields["READY"] == "1" && s.isStranger(m.pid) {
		s.follow(m.pid, "following a process the server command left behind, which declared itself ready")
	}
	if m.pid != s.main || s.phase != phaseRunning {
		if m.fields["READY"] == "1" && s.readyLeft != nil && len(s.readyLeft) < 16 {
			s.readyLeft[m.pid] = m // a process the command may leave behind
		}
		return // an old generation's last words, or not (yet) followed
	}
	var out []string
	for _, line := range m.lines {
		k, _, _ := strings.Cut(line, "=")
		switch k {
		case "READY", "RELOADING", "STOPPING", "STATUS", "WATCHDOG", "EXTEND_TIMEOUT_USEC", "MONOTONIC_USEC", "ERRNO":
			out = append(out, line)
		}
	}
	if m.fields["READY"] == "1" {
		s.everReady, s.readyLeft = true, nil
		s.checkGroup()
	}
	if len(out) > 0 {
		s.notify(out...)
	}
}

// follow makes pid the main process.
func (s *supervision) follow(pid int, why string) {
	s.log.Info(why, "pid", pid, "previous", s.main)
	g := newGeneration(pid)
	s.mu.Lock()
	if old := s.gens[s.main]; old != nil && !old.alive(s.main) {
		delete(s.gens, s.main)
	}
	s.gens[pid] = g
	s.mu.Unlock()
	s.main, s.deadline = pid, nil
	s.setPhase(phaseRunning)
	if len(s.pending) > 0 {
		s.asked = s.sync()
	}
}

// fromService reports whether a datagram from pid (uid), as the kernel
// tells them, comes from the service: a generation we know, or a
// descendant of ours with a user ID the service runs as (ours, or one a
// known generation sent as: a server may drop privileges). Another user's
// datagrams cost a map look-up. It is called by the notify reader.
func (s *supervision) fromService(pid int, uid uint32) bool {
	if pid <= 0 {
		return false
	}
	s.mu.Lock()
	g, known := s.gens[pid]
	if known && g.reused(pid) {
		// A datagram queued by a generation that has exited is still its
		// own (the credentials are the sender's when it sent), but a
		// process that has its PID now is not the service.
		delete(s.gens, pid)
		known = false
	}
	if known && len(s.uids) < 16 {
		s.uids[uid] = true
	}
	ours := s.uids[uid]
	s.mu.Unlock()
	if known {
		return true
	}
	if !ours || !procMatches() {
		return ours
	}
	self := os.Getpid()
	for range 64 { // deeper than any service's tree
		if pid == self {
			return true
		}
		if pid <= 1 {
			return false
		}
		st, ok := procStat(pid)
		if !ok {
			return false
		}
		pid = st.ppid
	}
	return false
}

// draining returns the older generations still alive.
func (s *supervision) draining() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []int
	for pid, g := range s.gens {
		if pid == s.main {
			continue
		}
		if g.alive(pid) {
			out = append(out, pid)
		} else {
			delete(s.gens, pid)
		}
	}
	return out
}

// strangers returns our live children that are no generation we know (nor
// the warden).
func (s *supervision) strangers() []int {
	var out []int
	for _, pid := range s.liveChildren() {
		if s.isStranger(pid) {
			out = append(out, pid)
		}
	}
	return out
}

func (s *supervision) isStranger(pid int) bool {
	s.mu.Lock()
	_, known := s.gens[pid]
	s.mu.Unlock()
	if known || pid == s.warden {
		return false
	}
	st, ok := procStat(pid)
	return ok && st.ppid == os.Getpid() && st.state != "Z"
}

// procMatches reports whether /proc shows our PID namespace (a PID
// namespace entered without a /proc of its own sees another's), without
// which the supervisor cannot look at other processes.
var procMatches = sync.OnceValue(func() bool {
	self, err := os.Readlink("/proc/self")
	return err == nil && self == strconv.Itoa(os.Getpid())
})

// gone reports whether pid has exited (or is a zombie) without being our
// child: wait4 will not report it.
func gone(pid int) bool {
	if !procMatches() {
		return false
	}
	st, ok := procStat(pid)
	if !ok {
		return true
	}
	return st.state == "Z" && st.ppid != os.Getpid()
}

// liveChildren returns our children that are not zombies, but the warden.
func (s *supervision) liveChildren() []int {
	if !procMatches() {
		return nil
	}
	paths, _ := filepath.Glob("/proc/[0-9]*/stat")
	var out []int
	for _, p := range paths {
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if st, ok := procStat(pid); ok && st.ppid == os.Getpid() && st.state != "Z" && pid != s.warden {
			out = append(out, pid)
		}
	}
	return out
}

// notifyReader reads the notify socket. It never waits for anything but
// the socket and its out channel, which the loop always reads: a datagram
// not from the service is dropped as soon as it is read, and a sync needs
// no room in the socket's queue (the datagram barrier it replaces blocked
// the loop while a flood kept the queue full).
type notifyReader struct {
	sock        *net.UnixConn
	raw         syscall.RawConn
	out         chan message
	syncs       chan struct{}
	asked       atomic.Uint64
	stop        chan struct{}
	fromService func(pid int, uid uint32) bool
}

// sync asks for a message with synced set, after every datagram queued
// now. It never blocks: the reader is woken by a read deadline.
// A synced message carries the number of the last request made before the
// reader took it; the loop waits for one with the number sync returned.
func (r *notifyReader) sync() uint64 {
	n := r.asked.Add(1)
	select {
	case r.syncs <- struct{}{}:
	default: // one is asked for already, and answers this one too
	}
	r.sock.SetReadDeadline(time.Now())
	return n
}

// run reads until the socket is closed or stop is. A request is taken at
// the top of the loop; one made later sets the deadline after its send, so
// that a read already waiting wakes, and clearing the deadline can only
// clear one whose request is already in syncs.
func (r *notifyReader) run() {
	buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(unix.SizeofUcred))
	for {
		select {
		case <-r.syncs:
			seq := r.asked.Load()
			for range maxSyncRead {
				m, ok, err := r.recv(buf, oob, false)
				if errors.Is(err, os.ErrDeadlineExceeded) {
					r.sock.SetReadDeadline(time.Time{}) // a later request's: taken next
					continue
				}
				if err != nil {
					break // all read (EAGAIN)
				}
				if ok && !r.deliver(m) {
					return
				}
			}
			if !r.deliver(message{synced: true, seq: seq}) {
				return
			}
			continue
		default:
		}
		m, ok, err := r.recv(buf, oob, true)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			r.sock.SetReadDeadline(time.Time{})
			continue
		}
		if err != nil {
			return
		}
		if ok && !r.deliver(m) {
			return
		}
	}
}

func (r *notifyReader) deliver(m message) bool {
	select {
	case r.out <- m:
		return true
	case <-r.stop:
		return false
	}
}

// recv reads one datagram, waiting for one if wait is set; ok is false for
// one that is not from the service.
func (r *notifyReader) recv(buf, oob []byte, wait bool) (m message, ok bool, err error) {
	var n, oobn int
	var rerr error
	err = r.raw.Read(func(fd uintptr) bool {
		for {
			n, oobn, _, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_DONTWAIT)
			if rerr != unix.EINTR {
				break
			}
		}
		return !wait || rerr != unix.EAGAIN
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return m, false, err
	}
	cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return m, false, nil
	}
	var cred *unix.Ucred
	for _, c := range cmsgs {
		if cr, err := unix.ParseUnixCredentials(&c); err == nil {
			cred = cr
		}
	}
	if cred == nil || !r.fromService(int(cred.Pid), cred.Uid) {
		return m, false, nil
	}
	m = message{pid: int(cred.Pid), fields: map[string]string{}}
	for line := range strings.SplitSeq(string(buf[:n]), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			m.fields[k] = v
			m.lines = append(m.lines, line)
		}
	}
	return m, true, nil
}

// command prepares the first generation: its notify socket is ours, its
// watchdog pings come to us, sockets passed by activation go to it.
func command(cfg Config, notifySocket string, pgid int) (*exec.Cmd, error) {
	var env []string
	for _, kv := range os.Environ() {
		switch k, _, _ := strings.Cut(kv, "="); k {
		case "NOTIFY_SOCKET", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", trampolineEnv, wardenEnv:
		default:
			env = append(env, kv)
		}
	}
	env = append(env, "NOTIFY_SOCKET="+notifySocket)
	args := cfg.Command
	var files []*os.File
	if n, err := strconv.Atoi(os.Getenv("LISTEN_FDS")); err == nil && n > 0 && os.Getenv("LISTEN_PID") == strconv.Itoa(os.Getpid()) {
		for i := range n {
			files = append(files, os.NewFile(uintptr(3+i), "listen-fd-"+strconv.Itoa(3+i)))
		}
		env = append(env, "LISTEN_FDS="+strconv.Itoa(n), trampolineEnv+"=1")
		if names := os.Getenv("LISTEN_FDNAMES"); names != "" {
			env = append(env, "LISTEN_FDNAMES="+names)
		}
		self, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("supervisor: socket activation: %w", err)
		}
		args = append([]string{self}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = env
	cmd.ExtraFiles = files
	cmd.Stdin, cmd.Stdout, cmd.Stderr = cfg.Stdin, cfg.Stdout, cfg.Stderr
	// The warden's process group, out of the terminal's: a terminal's
	// Ctrl-C reaches the supervisor, which passes it on once, not every
	// generation twice. Every later generation inherits it; the warden
	// ends it, and its number is pinned while the warden lives.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pgid: pgid}
	return cmd, nil
}

// status is the exit code a shell would report for ws.
func status(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// procInfo is what /proc/PID/stat tells of a process.
type procInfo struct {
	state string // "R", "S", "Z", ...
	ppid  int
	pgrp  int
	start uint64 // since boot, in clock ticks: with the PID, names one process
}

// procStat returns what /proc tells of pid; ok is false if there is no
// such process.
func procStat(pid int) (st procInfo, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return st, false
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 20 {
		return st, false
	}
	st.state = f[0]
	st.ppid, _ = strconv.Atoi(f[1])
	st.pgrp, _ = strconv.Atoi(f[2])
	st.start, _ = strconv.ParseUint(f[19], 10, 64)
	return st, true
}
