// Package loadtest drives the reference server through upgrades under load.
// It is shared by the demo, the zero-downtime tests and the benchmarks.
package loadtest

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Build compiles the Go package pkg (an import path inside this module)
// into dir and returns the binary's path.
func Build(ctx context.Context, dir, pkg string, race bool) (string, error) {
	return BuildWith(ctx, dir, pkg, race, "")
}

// BuildWith is Build with -ldflags (for example "-X main.version=v2"), the
// binary named after pkg in dir.
func BuildWith(ctx context.Context, dir, pkg string, race bool, ldflags string) (string, error) {
	out := filepath.Join(dir, filepath.Base(pkg))
	args := []string{"build", "-o", out}
	if race {
		args = append(args, "-race")
	}
	if ldflags != "" {
		args = append(args, "-ldflags", ldflags)
	}
	args = append(args, pkg)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Env = os.Environ()
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
	}
	return out, nil
}

// FreeAddr returns a 127.0.0.1 address with a port that was free a moment ago.
func FreeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// Server is one reference server and the generations that replace it.
type Server struct {
	Addr    string
	PIDFile string

	mu    sync.Mutex
	pid   int                     // the generation serving now
	exits map[int]chan exitResult // one waiter per generation seen
}

type exitResult struct {
	code int
	err  error
}

// Config describes how to start a server.
type Config struct {
	Bin        string    // the binary; it must accept -addr and -pidfile
	Dir        string    // where the PID file goes
	Logs       io.Writer // the servers' stdout and stderr
	Args       []string  // extra arguments
	Env        []string  // extra environment variables
	ExtraFiles []*os.File
	// Prefix, when set, runs the binary through this command line, e.g.
	// {"sh", "-c", `exec "$0" "$@"`}; the binary and arguments follow it.
	Prefix []string
	Addr   string // address to serve on; a free port when empty
	TLS    bool   // the server speaks HTTPS (its certificate is not verified)
	// NoHTTP: the server has no /readyz; its PID file alone says it is ready.
	NoHTTP bool
}

// Start starts c.Bin with -addr and -pidfile, and waits until it is ready:
// its PID file names it and /readyz answers 200.
func Start(ctx context.Context, c Config) (*Server, error) {
	if err := BecomeSubreaper(); err != nil {
		return nil, err
	}
	addr := c.Addr
	if addr == "" {
		var err error
		if addr, err = FreeAddr(); err != nil {
			return nil, err
		}
	}
	s := &Server{Addr: addr, PIDFile: filepath.Join(c.Dir, "server.pid"), exits: map[int]chan exitResult{}}
	args := append([]string{c.Bin, "-addr", addr, "-pidfile", s.PIDFile}, c.Args...)
	args = append(append([]string(nil), c.Prefix...), args...)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = c.Logs, c.Logs
	cmd.Env = append(os.Environ(), c.Env...)
	cmd.ExtraFiles = c.ExtraFiles
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s.pid = cmd.Process.Pid
	exited := s.exitC(s.pid)
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if _, err := s.waitPIDFile(wctx, 0, exited); err != nil {
		s.Kill()
		return nil, fmt.Errorf("server did not become ready: %w", err)
	}
	if c.NoHTTP {
		return s, nil
	}
	base := "http://" + addr
	if c.TLS {
		base = "https://" + addr
	}
	if err := waitReady(wctx, base); err != nil {
		s.Kill()
		return nil, err
	}
	return s, nil
}

// exitC returns the channel that receives pid's exit, starting its waiter
// on first use. pid must be our child: the first generation, or a later one
// once its parent has exited (we are the subreaper).
func (s *Server) exitC(pid int) chan exitResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.exits[pid]; ok {
		return c
	}
	c := make(chan exitResult, 1)
	s.exits[pid] = c
	go func() {
		p, err := os.FindProcess(pid)
		if err != nil {
			c <- exitResult{-1, err}
			return
		}
		st, err := p.Wait()
		if err != nil {
			c <- exitResult{-1, err}
			return
		}
		c <- exitResult{st.ExitCode(), nil}
	}()
	return c
}

// WaitExit waits for generation pid to exit and returns its exit code. When
// ctx ends first the process is killed and ErrNotExited returned.
func (s *Server) WaitExit(ctx context.Context, pid int) (int, error) {
	c := s.exitC(pid)
	select {
	case r := <-c:
		c <- r // later callers see it too
		return r.code, r.err
	case <-ctx.Done():
		signalPID(pid, syscall.SIGKILL)
		r := <-c
		c <- r
		return r.code, ErrNotExited
	}
}

// PID returns the PID of the generation serving now.
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pid
}

// Follow makes the generation named by the PID file the serving one, after
// an upgrade triggered outside [Server.Upgrade].
func (s *Server) Follow() {
	if pid := ReadPIDFile(s.PIDFile); pid != 0 {
		s.mu.Lock()
		s.pid = pid
		s.mu.Unlock()
	}
}

// ReadPIDFile returns the PID the PID file names, or 0.
func ReadPIDFile(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// waitPIDFile waits until the PID file names a PID other than old.
func (s *Server) waitPIDFile(ctx context.Context, old int, exited <-chan exitResult) (int, error) {
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for {
		if pid := ReadPIDFile(s.PIDFile); pid != 0 && pid != old {
			return pid, nil
		}
		select {
		case r := <-exited:
			return 0, fmt.Errorf("process exited with code %d (%v)", r.code, r.err)
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-t.C:
		}
	}
}

// WaitReady polls GET /readyz until it answers 200 or ctx ends.
func WaitReady(ctx context.Context, addr string) error { return waitReady(ctx, "http://"+addr) }

func waitReady(ctx context.Context, base string) error {
	tr := NewTransport("", true)
	tr.TLSClientConfig = &tls.Config{InsecureSkipVerify: true}
	c := &http.Client{Timeout: time.Second, Transport: tr}
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	var last error
	for {
		resp, err := c.Get(base + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("readyz: %s", resp.Status)
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("not ready: %v (last: %v)", ctx.Err(), last)
		case <-t.C:
		}
	}
}

// Upgrade is the outcome of one upgrade.
type Upgrade struct {
	OldPID, NewPID int
	Ready          time.Duration // signal to new PID in the PID file
	OldExit        time.Duration // signal to old process exit
	ExitCode       int
}

// Upgrade sends SIGHUP to the serving generation, waits for its successor
// to write the PID file, then for the old process to exit.
func (s *Server) Upgrade(ctx context.Context, timeout time.Duration) (Upgrade, error) {
	old := s.PID()
	u := Upgrade{OldPID: old, ExitCode: -1}
	start := time.Now()
	if err := signalPID(old, syscall.SIGHUP); err != nil {
		return u, err
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	pid, err := s.waitPIDFile(wctx, old, nil)
	if err != nil {
		return u, fmt.Errorf("no new process: %w", err)
	}
	u.NewPID, u.Ready = pid, time.Since(start)
	s.mu.Lock()
	s.pid = pid
	s.mu.Unlock()
	code, err := s.WaitExit(wctx, old)
	u.ExitCode, u.OldExit = code, time.Since(start)
	if err != nil {
		return u, fmt.Errorf("old process %d: %w", old, err)
	}
	return u, nil
}

// Signal sends sig to the serving generation.
func (s *Server) Signal(sig os.Signal) error { return signalPID(s.PID(), sig) }

// Stop sends SIGTERM to the serving generation and returns its exit code.
func (s *Server) Stop(ctx context.Context, timeout time.Duration) (int, error) {
	pid := s.PID()
	if err := signalPID(pid, syscall.SIGTERM); err != nil {
		return -1, err
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return s.WaitExit(wctx, pid)
}

// Kill sends SIGKILL to every generation that has not been seen to exit, and
// reaps those that are our children. Safe to call more than once.
func (s *Server) Kill() {
	s.mu.Lock()
	pids := []int{s.pid}
	for pid := range s.exits {
		pids = append(pids, pid)
	}
	s.mu.Unlock()
	// Last, the generation the PID file names, if nobody followed it: by
	// then its parent is gone and it is our child.
	if pid := ReadPIDFile(s.PIDFile); pid != 0 && !slices.Contains(pids, pid) {
		pids = append(pids, pid)
	}
	for _, pid := range pids {
		c := s.exitC(pid)
		select {
		case r := <-c:
			c <- r
			if r.err == nil {
				continue
			}
		default:
		}
		signalPID(pid, syscall.SIGKILL)
		select {
		case r := <-c:
			c <- r
		case <-time.After(5 * time.Second):
		}
	}
}

func signalPID(pid int, sig os.Signal) error {
	p, err := os.FindProcess(pid)
	if err != nil {
		return err
	}
	return p.Signal(sig)
}

// ErrNotExited is returned by WaitExit when the process outlives ctx; it
// has then been killed.
var ErrNotExited = errors.New("process did not exit in time (killed)")

// WriteExecutable installs content as the executable at path, atomically
// (a temporary file renamed over it). It holds syscall.ForkLock while the
// file is open for writing: a process forked meanwhile would hold the
// descriptor until its exec, and exec'ing path would then fail with "text
// file busy" (golang/go#22315).
func WriteExecutable(path string, content io.Reader) error {
	tmp := path + ".new"
	syscall.ForkLock.Lock()
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err == nil {
		_, err = io.Copy(f, content)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	syscall.ForkLock.Unlock()
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, path)
}

// StartPackage builds the Go package pkg into a temporary directory of tb
// and starts it with cfg (whose Bin, Dir and Logs it sets). The server is
// killed when the test ends, and its log printed if the test failed.
func StartPackage(tb testing.TB, pkg string, cfg Config) *Server {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := tb.TempDir()
	bin, err := Build(ctx, dir, pkg, false)
	if err != nil {
		tb.Fatal(err)
	}
	logs, err := os.Create(filepath.Join(dir, "server.log"))
	if err != nil {
		tb.Fatal(err)
	}
	cfg.Bin, cfg.Dir, cfg.Logs = bin, dir, logs
	srv, err := Start(ctx, cfg)
	tb.Cleanup(func() {
		if srv != nil {
			srv.Kill()
		}
		logs.Close()
		if tb.Failed() {
			b, _ := os.ReadFile(logs.Name())
			tb.Logf("server logs:\n%s", b)
		}
	})
	if err != nil {
		tb.Fatal(err)
	}
	return srv
}
