//go:build linux

package supervisor

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// trampolineEnv marks the supervisor's own binary started to exec the
// server with LISTEN_PID naming it (see Trampoline).
const trampolineEnv = "GRACEFUL_SUPERVISE_EXEC"

// barrier is the message the supervisor sends itself on its notify socket:
// every message the server sent before it has been handled when it comes
// back.
const barrier = "X_GRACEFUL_SUPERVISOR_BARRIER=1"

// forwarded are the signals passed on to the current generation.
var forwarded = []os.Signal{unix.SIGHUP, unix.SIGTERM, unix.SIGINT, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2}

// Trampoline, called first in the supervisor's main, execs the server when
// this process was started by Run to do so: socket activation needs
// LISTEN_PID to name the server's own PID, which is known only in the
// process that becomes the server. Otherwise it returns at once.
func Trampoline() {
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

type message struct {
	pid    int // the sender
	fields map[string]string
	lines  []string
}

func run(ctx context.Context, cfg Config) (int, error) {
	log := cfg.Log
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return 0, fmt.Errorf("supervisor: becoming a child subreaper: %w", err)
	}
	// Nothing we were given leaks to the server but what command passes
	// on (socket-activated descriptors, by ExtraFiles).
	unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	// An abstract socket: nothing on disk to leave behind, even if we are
	// killed, and no writable directory needed.
	addr := &net.UnixAddr{Name: fmt.Sprintf("@graceful-supervisor-%d-%d", os.Getpid(), time.Now().UnixNano()), Net: "unixgram"}
	sock, err := net.ListenUnixgram("unixgram", addr)
	if err != nil {
		return 0, fmt.Errorf("supervisor: notify socket: %w", err)
	}
	defer sock.Close()
	if raw, err := sock.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
	}
	if err != nil {
		return 0, fmt.Errorf("supervisor: notify socket credentials: %w", err)
	}
	self, err := net.DialUnix("unixgram", nil, addr)
	if err != nil {
		return 0, fmt.Errorf("supervisor: notify socket: %w", err)
	}
	defer self.Close()

	sigs := make(chan os.Signal, 32)
	signal.Notify(sigs, append([]os.Signal{unix.SIGCHLD}, forwarded...)...)
	defer signal.Stop(sigs)

	cmd, err := command(cfg, addr.Name)
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
	log.Info("supervising", "pid", os.Getpid(), "server", main)
	if !procMatches() {
		log.Warn("/proc is not this PID namespace's (mount a /proc of its own): a generation that dies under its predecessor is not noticed")
	}

	msgs := make(chan message, 64)
	readDone, stopRead := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(readDone)
		readMessages(sock, msgs, stopRead)
	}()
	defer func() {
		close(stopRead)
		sock.Close()
		<-readDone
	}()

	relay := os.Getenv("NOTIFY_SOCKET") != ""
	notify := func(lines ...string) {
		if relay {
			if _, err := daemon.SdNotify(false, strings.Join(lines, "\n")); err != nil {
				log.Warn("notify: relaying to the service manager failed", "err", err)
			}
		}
	}
	// A barrier orders what we do against what the server said before:
	// signals go to the main PID as of their arrival, and the decision
	// that the service ended waits for a successor's MAINPID= sent
	// before its predecessor's exit.
	var pending []syscall.Signal
	barrierSent := false
	sendBarrier := func() bool {
		if barrierSent {
			return true
		}
		if _, err := self.Write([]byte(barrier)); err != nil {
			log.Error("notify socket: barrier", "err", err)
			return false
		}
		barrierSent = true
		return true
	}
	exitCode, mainExited := 0, false
	var grace <-chan time.Time // waiting for a successor to announce itself
	check := time.NewTicker(200 * time.Millisecond)
	defer check.Stop()
	ctxDone := ctx.Done()
	for {
		select {
		case <-ctxDone:
			ctxDone = nil
			pending = append(pending, unix.SIGTERM)
			if !sendBarrier() {
				return exitCode, nil
			}
		case sig := <-sigs:
			if sig != unix.SIGCHLD {
				pending = append(pending, sig.(syscall.Signal))
				if !sendBarrier() {
					return exitCode, nil
				}
				continue
			}
			for {
				var ws unix.WaitStatus
				pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
				if pid == main && !mainExited {
					mainExited, exitCode = true, status(ws)
					log.Info("server exited", "pid", pid, "code", exitCode)
				}
			}
			if mainExited && !sendBarrier() {
				return exitCode, nil
			}
		case <-check.C:
			// A generation that is not our child (it was its
			// predecessor's, which reaps it) can die unseen by wait4.
			if !mainExited && gone(main) {
				mainExited, exitCode = true, 1
				log.Error("server exited; its status went to its parent", "pid", main)
				if !sendBarrier() {
					return exitCode, nil
				}
			}
		case <-grace:
			log.Info("no generation announced itself; exiting", "code", exitCode)
			return exitCode, nil
		case m := <-msgs:
			if m.pid == os.Getpid() && m.fields[barrierKey] != "" {
				barrierSent = false
				if !mainExited {
					for _, sig := range pending {
						log.Info("forwarding signal", "signal", sig.String(), "to", main)
						unix.Kill(main, sig)
					}
					pending = nil
					continue
				}
				if grace == nil && len(liveChildren()) > 0 {
					// A successor reparented to us may not have spoken
					// yet (its predecessor died before announcing it).
					grace = time.After(successorGrace)
					continue
				}
				if grace == nil {
					return exitCode, nil
				}
				continue
			}
			if next := handle(m, main, notify); next != main {
				log.Info("new generation", "pid", next, "previous", main)
				main, mainExited, grace = next, false, nil
				if len(pending) > 0 && !sendBarrier() {
					return exitCode, nil
				}
			}
		}
	}
}

// barrierKey is the field of the barrier message.
var barrierKey, _, _ = strings.Cut(barrier, "=")

// successorGrace is how long, after the main process exited, a live child
// has to announce itself as the next generation.
const successorGrace = 2 * time.Second

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
	ppid, state := procStat(pid)
	if state == "" {
		return true
	}
	return state == "Z" && ppid != os.Getpid()
}

// liveChildren returns our children that are not zombies.
func liveChildren() []int {
	if !procMatches() {
		return nil
	}
	paths, _ := filepath.Glob("/proc/[0-9]*/stat")
	var out []int
	for _, p := range paths {
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if ppid, state := procStat(pid); ppid == os.Getpid() && state != "Z" && state != "" {
			out = append(out, pid)
		}
	}
	return out
}

// handle acts on one notify message and returns the main PID after it.
func handle(m message, main int, notify func(...string)) int {
	if v, ok := m.fields["MAINPID"]; ok {
		pid, err := strconv.Atoi(v)
		// From the current generation about its successor, or from a
		// successor about itself; either way a child of the current
		// generation, or of ours once its parent is gone.
		if err == nil && pid > 0 && pid != main && (m.pid == main || m.pid == pid) {
			if ppid, _ := procStat(pid); ppid == main || ppid == os.Getpid() || !procMatches() {
				main = pid
			}
		}
	}
	if m.pid != main {
		return main // an old generation's last words, or a stranger
	}
	var out []string
	for _, line := range m.lines {
		k, _, _ := strings.Cut(line, "=")
		switch k {
		case "READY", "RELOADING", "STOPPING", "STATUS", "WATCHDOG", "EXTEND_TIMEOUT_USEC", "MONOTONIC_USEC", "ERRNO":
			out = append(out, line)
		}
	}
	if len(out) > 0 {
		notify(out...)
	}
	return main
}

// readMessages delivers the notify messages that arrive on sock until it is
// closed or stop is.
func readMessages(sock *net.UnixConn, out chan<- message, stop <-chan struct{}) {
	buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(unix.SizeofUcred))
	for {
		n, oobn, _, _, err := sock.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		m := message{fields: map[string]string{}}
		if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, c := range cmsgs {
				if cred, err := unix.ParseUnixCredentials(&c); err == nil {
					m.pid = int(cred.Pid)
				}
			}
		}
		for line := range strings.SplitSeq(string(buf[:n]), "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				m.fields[k] = v
				m.lines = append(m.lines, line)
			}
		}
		select {
		case out <- m:
		case <-stop:
			return
		}
	}
}

// command prepares the first generation: its notify socket is ours, its
// watchdog pings come to us, sockets passed by activation go to it.
func command(cfg Config, notifySocket string) (*exec.Cmd, error) {
	var env []string
	for _, kv := range os.Environ() {
		switch k, _, _ := strings.Cut(kv, "="); k {
		case "NOTIFY_SOCKET", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", trampolineEnv:
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
	// Its own process group: a terminal's Ctrl-C reaches the supervisor,
	// which passes it on once, not every generation twice.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd, nil
}

// status is the exit code a shell would report for ws.
func status(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// procStat returns pid's parent and state ("R", "S", "Z", ...), or 0 and
// "" if there is no such process.
func procStat(pid int) (ppid int, state string) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, ""
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 2 {
		return 0, ""
	}
	ppid, _ = strconv.Atoi(f[1])
	return ppid, f[0]
}
