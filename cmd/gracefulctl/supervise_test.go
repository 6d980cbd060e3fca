//go:build linux

package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// notified is one message received on a test's NOTIFY_SOCKET.
type notified struct {
	pid  int // the sender
	text string
}

// notifySocket is a NOTIFY_SOCKET as a service manager has one: it records
// every message with its sender.
type notifySocket struct {
	path string
	conn *net.UnixConn
	mu   sync.Mutex
	msgs []notified
	more chan struct{} // receives after each message
}

func listenNotify(t *testing.T) *notifySocket {
	t.Helper()
	n := &notifySocket{path: filepath.Join(t.TempDir(), "notify"), more: make(chan struct{}, 1)}
	var err error
	n.conn, err = net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	require.NoError(t, err)
	raw, err := n.conn.SyscallConn()
	require.NoError(t, err)
	raw.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf, oob := make([]byte, 4096), make([]byte, 1024)
		for {
			k, oobn, _, _, err := n.conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			m := notified{text: string(buf[:k])}
			if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, c := range cmsgs {
					if cred, err := unix.ParseUnixCredentials(&c); err == nil {
						m.pid = int(cred.Pid)
					}
				}
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, m)
			n.mu.Unlock()
			select {
			case n.more <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		n.conn.Close()
		<-done
	})
	return n
}

func (n *notifySocket) all() []notified {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]notified(nil), n.msgs...)
}

// waitFor waits until the messages from index from on contain one with the
// line want, and returns the index after it.
func (n *notifySocket) waitFor(t *testing.T, from int, want string) int {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		msgs := n.all()
		for i := from; i < len(msgs); i++ {
			for line := range strings.SplitSeq(msgs[i].text, "\n") {
				if line == want {
					return i + 1
				}
			}
		}
		select {
		case <-n.more:
		case <-deadline:
			t.Fatalf("no %q on the notify socket; got %+v", want, msgs)
		}
	}
}

// TestSupervise runs the reference server under `gracefulctl supervise`
// as a service manager would: the supervisor's PID is the one the manager
// knows for the service's whole life. Three upgrades (SIGHUP to the
// supervisor) under load lose nothing; the manager hears RELOADING=1 and
// READY=1 for each, never a MAINPID=, always from the supervisor, and the
// last status is the serving generation's own; SIGTERM to the supervisor
// drains the last generation (requests in flight answered) and the
// supervisor exits 0; a server killed by a signal makes it exit 128+N.
func TestSupervise(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.NoError(t, loadtest.BecomeSubreaper())
	dir, ctl, server := buildTools(t, ctx)
	ns := listenNotify(t)
	addr, err := loadtest.FreeAddr()
	require.NoError(t, err)
	pidfile := filepath.Join(dir, "server.pid")

	sup := exec.Command(ctl, "supervise", "--", server, "-addr", addr, "-pidfile", pidfile)
	sup.Env = append(os.Environ(), "NOTIFY_SOCKET="+ns.path)
	exited := startWatched(t, sup)
	next := ns.waitFor(t, 0, "READY=1")
	require.NoError(t, loadtest.WaitReady(ctx, addr))
	gens := []int{loadtest.ReadPIDFile(pidfile)}
	assert.NotEqual(t, sup.Process.Pid, gens[0], "the server is a child of the supervisor")
	// Every generation is in the first one's process group (the
	// warden's): a test that fails midway leaves none behind.
	defer killGroupOf(gens[0])()

	load := loadtest.StartLoad(addr, loadtest.Mix{KeepAliveGET: 2, KeepAlivePOST: 2, FreshGET: 1, Slow: 1, SSE: 1, WS: 1})
	for i := range 3 {
		require.NoError(t, sup.Process.Signal(syscall.SIGHUP))
		next = ns.waitFor(t, next, "RELOADING=1")
		next = ns.waitFor(t, next, "READY=1")
		var pid int
		for deadline := time.Now().Add(30 * time.Second); pid == 0 || pid == gens[len(gens)-1]; time.Sleep(5 * time.Millisecond) {
			require.False(t, time.Now().After(deadline), "upgrade %d: no new PID", i)
			pid = loadtest.ReadPIDFile(pidfile)
		}
		gens = append(gens, pid)
		// The old generation exits, reaped, and the new one is reparented
		// to the supervisor (only then may the next upgrade start).
		require.Equal(t, pid, onlyChildBut(t, fmt.Sprintf("upgrade %d", i), sup.Process.Pid, gens[len(gens)-2]))
	}
	stats := load.Stop()
	assert.Zero(t, stats.Failed(), "failures: %v %v", stats.Failures, stats.Samples)
	assert.Positive(t, stats.Requests)

	// Requests in flight when the manager stops the service, each on a
	// connection the server has already accepted and served (a connection
	// still in the listen queue when a final drain closes the listener is
	// reset by the kernel, whoever serves).
	const inFlight = 3
	answers, sent := make(chan int, inFlight), make(chan struct{}, inFlight)
	for range inFlight {
		go func() {
			client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{}}
			defer client.CloseIdleConnections()
			if resp, err := client.Get("http://" + addr + "/"); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			trace := &httptrace.ClientTrace{WroteRequest: func(httptrace.WroteRequestInfo) { sent <- struct{}{} }}
			req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodGet, "http://"+addr+"/slow?ms=1500", nil)
			resp, err := client.Do(req)
			if err != nil {
				t.Logf("in-flight request: %v", err)
				answers <- 0
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			answers <- resp.StatusCode
		}()
	}
	for range inFlight {
		<-sent // the server has the request
	}
	require.NoError(t, sup.Process.Signal(syscall.SIGTERM))
	select {
	case code := <-exited:
		assert.Equal(t, 0, code, "the supervisor exits with the last generation's status")
	case <-time.After(60 * time.Second):
		t.Fatal("the supervisor did not exit")
	}
	for range inFlight {
		assert.Equal(t, http.StatusOK, <-answers, "a request in flight at the stop was answered")
	}
	last := gens[len(gens)-1]
	assert.False(t, loadtest.Alive(last))

	var statuses []string
	for _, m := range ns.all() {
		assert.Equal(t, sup.Process.Pid, m.pid, "every message comes from the supervisor: %q", m.text)
		assert.NotContains(t, m.text, "MAINPID=", "the supervisor stays the main process")
		for line := range strings.SplitSeq(m.text, "\n") {
			if s, ok := strings.CutPrefix(line, "STATUS="); ok {
				statuses = append(statuses, s)
			}
		}
	}
	require.NotEmpty(t, statuses)
	// The last one before the stop names the serving generation.
	var beforeStop string
	for _, s := range statuses {
		if !strings.HasPrefix(s, "draining") {
			beforeStop = s
		}
	}
	assert.Contains(t, beforeStop, "serving (pid "+strconv.Itoa(last))

	t.Run("server killed", func(t *testing.T) {
		pidfile := filepath.Join(t.TempDir(), "server.pid")
		addr, err := loadtest.FreeAddr()
		require.NoError(t, err)
		sup := exec.Command(ctl, "supervise", server, "-addr", addr, "-pidfile", pidfile)
		require.NoError(t, sup.Start())
		defer sup.Process.Kill()
		require.NoError(t, loadtest.WaitReady(ctx, addr))
		defer killGroupOf(loadtest.ReadPIDFile(pidfile))()
		require.NoError(t, syscall.Kill(loadtest.ReadPIDFile(pidfile), syscall.SIGKILL))
		err = sup.Wait()
		assert.Equal(t, 128+9, sup.ProcessState.ExitCode(), "%v", err)
	})
}

// isWarden reports whether pid is a supervisor's warden (its own binary,
// started to end the server if the supervisor is killed).
func isWarden(pid int) bool {
	env, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	return bytes.Contains(env, []byte("GRACEFUL_SUPERVISE_WARDEN=1\x00"))
}

// childrenOf returns pid's children but its warden, zombies (not yet
// reaped) included, and how many are zombies.
func childrenOf(pid int) (all []int, zombies int) {
	paths, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if ppid, _ := strconv.Atoi(f[1]); len(f) > 1 && ppid == pid {
			child, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
			if isWarden(child) {
				continue
			}
			all = append(all, child)
			if f[0] == "Z" {
				zombies++
			}
		}
	}
	return all, zombies
}

// TestSupervisePID1: the supervisor as PID 1 of a new PID namespace, as in
// a container, upgrades the server in place under load (SIGHUP from
// outside) without a failed request, reaps an orphan the server's start-up
// leaves behind, and on SIGTERM drains and exits with the server's status.
func TestSupervisePID1(t *testing.T) {
	unshare := needPIDNamespace(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.NoError(t, loadtest.BecomeSubreaper())
	dir, ctl, server := buildTools(t, ctx)
	addr, err := loadtest.FreeAddr()
	require.NoError(t, err)
	pidfile := filepath.Join(dir, "server.pid") // PIDs of the namespace: they only tell generations apart

	// The shell leaves an orphan (its subshell exits at once), then
	// becomes the server.
	// A /proc of its own, as a container has.
	cmd := exec.Command(unshare, "--pid", "--mount-proc", "--fork", "--kill-child", "--", ctl, "supervise", "--",
		"sh", "-c", `(sleep 0.2 &); exec "$0" "$@"`, server, "-addr", addr, "-pidfile", pidfile)
	exited := startWatched(t, cmd) // killing unshare (--kill-child) ends the namespace
	sup := supervisorIn(t, cmd)
	require.NoError(t, loadtest.WaitReady(ctx, addr))

	// The orphan was reparented to PID 1 and reaped: only the server is
	// left as its child.
	child := onlyChildBut(t, "start-up", sup, 0)

	load := loadtest.StartLoad(addr, loadtest.Mix{KeepAliveGET: 2, KeepAlivePOST: 2, FreshGET: 1, Slow: 1, SSE: 1, WS: 1})
	gen := loadtest.ReadPIDFile(pidfile)
	for i := range 3 {
		require.NoError(t, syscall.Kill(sup, syscall.SIGHUP))
		for deadline := time.Now().Add(30 * time.Second); loadtest.ReadPIDFile(pidfile) == gen; time.Sleep(5 * time.Millisecond) {
			require.False(t, time.Now().After(deadline), "upgrade %d: no new generation", i)
		}
		gen = loadtest.ReadPIDFile(pidfile)
		// The old generation exits, reaped; the new one is reparented to
		// PID 1.
		child = onlyChildBut(t, fmt.Sprintf("upgrade %d", i), sup, child)
	}
	stats := load.Stop()
	assert.Zero(t, stats.Failed(), "failures: %v %v", stats.Failures, stats.Samples)
	assert.GreaterOrEqual(t, len(stats.PIDs), 4, "requests answered by every generation")

	require.NoError(t, syscall.Kill(sup, syscall.SIGTERM))
	select {
	case code := <-exited:
		assert.Equal(t, 0, code, "PID 1 exits with the server's status after the drain")
	case <-time.After(60 * time.Second):
		t.Fatal("PID 1 did not exit")
	}
}

// startWatched starts cmd with its output collected, and returns the
// channel of its exit code. When the test ends cmd is killed and, if the
// test failed, its output logged.
func startWatched(t *testing.T, cmd *exec.Cmd) <-chan int {
	t.Helper()
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	// Generations left behind hold the output pipe: the exit code must not
	// wait for them.
	cmd.WaitDelay = 500 * time.Millisecond
	require.NoError(t, cmd.Start())
	exited := make(chan int, 1)
	waited := make(chan struct{}) // logs is complete
	go func() {
		defer close(waited)
		cmd.Wait()
		exited <- cmd.ProcessState.ExitCode()
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-waited
		if t.Failed() {
			t.Logf("output of %s:\n%s", cmd.Path, logs.String())
		}
	})
	return exited
}

// TestSuperviseSuccessorDies: a new generation that dies while its
// predecessor still drains is its predecessor's child, so its exit status
// goes there, not to the supervisor; the supervisor notices anyway and
// exits 1, so that its manager restarts the service, instead of running on
// with nothing serving; but only once the predecessor has finished its
// drain (the request it serves is answered), never orphaning it.
func TestSuperviseSuccessorDies(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.NoError(t, loadtest.BecomeSubreaper())
	dir, ctl, live, bad := buildPanicking(t, ctx)
	addr, err := loadtest.FreeAddr()
	require.NoError(t, err)
	pidfile := filepath.Join(dir, "server.pid")
	sup := exec.Command(ctl, "supervise", "--", live, "-addr", addr, "-pidfile", pidfile)
	exited := startWatched(t, sup)
	require.NoError(t, loadtest.WaitReady(ctx, addr))
	old := loadtest.ReadPIDFile(pidfile)
	defer killGroupOf(old)()

	// A request that keeps the old generation draining for 5 s.
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c.Close()
	_, err = io.WriteString(c, "GET /slow?ms=5000 HTTP/1.1\r\nHost: t\r\n\r\n")
	require.NoError(t, err)
	answered := make(chan string, 1)
	go func() {
		c.SetReadDeadline(time.Now().Add(2 * time.Minute))
		b, _ := io.ReadAll(io.LimitReader(c, 1<<20))
		answered <- string(b)
	}()

	b, err := os.ReadFile(bad)
	require.NoError(t, err)
	require.NoError(t, loadtest.WriteExecutable(live, bytes.NewReader(b)))
	start := time.Now()
	require.NoError(t, sup.Process.Signal(syscall.SIGHUP))
	select {
	case code := <-exited:
		assert.Equal(t, 1, code)
		assert.False(t, loadtest.Alive(old), "the supervisor exited %v after the SIGHUP while the old generation still drained", time.Since(start).Round(time.Millisecond))
	case <-time.After(60 * time.Second):
		t.Fatal("the supervisor runs on with no server")
	}
	select {
	case resp := <-answered:
		assert.True(t, strings.HasPrefix(resp, "HTTP/1.1 200 "), "the request the old generation drained: %q", resp)
	case <-time.After(time.Minute):
		t.Fatal("the request in flight was never answered")
	}
}

// onlyChildBut waits until parent has one child, not old and not a zombie
// (every other one exited and reaped), and returns it.
func onlyChildBut(t *testing.T, what string, parent, old int) int {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		all, zombies := childrenOf(parent)
		if len(all) == 1 && zombies == 0 && all[0] != old {
			return all[0]
		}
		require.False(t, time.Now().After(deadline), "%s: %d has children %v (%d zombies)", what, parent, all, zombies)
	}
}

// startSupervised runs server under gracefulctl supervise (ctl), serving on
// a free address with its PID file in dir, and waits until it answers.
func startSupervised(t *testing.T, ctx context.Context, dir, ctl, server string) (sup *exec.Cmd, exited <-chan int, addr, pidfile string) {
	t.Helper()
	addr, err := loadtest.FreeAddr()
	require.NoError(t, err)
	pidfile = filepath.Join(dir, "server.pid")
	sup = exec.Command(ctl, "supervise", "--", server, "-addr", addr, "-pidfile", pidfile)
	exited = startWatched(t, sup)
	require.NoError(t, loadtest.WaitReady(ctx, addr))
	return sup, exited, addr, pidfile
}

// buildPanicking builds the tools, puts the good reference server at a
// path of its own (live, which deploys replace) and builds bad, a server
// that panics 200 ms after it starts serving.
func buildPanicking(t *testing.T, ctx context.Context) (dir, ctl, live, bad string) {
	t.Helper()
	dir, ctl, good := buildTools(t, ctx)
	bad, err := loadtest.BuildWith(ctx, filepath.Join(dir, "bad"), "github.com/graceful-go/graceful/examples/httpserver", false, "-X main.panicAfter=200ms")
	require.NoError(t, err)
	live = filepath.Join(dir, "srv", "httpserver")
	require.NoError(t, os.MkdirAll(filepath.Dir(live), 0o755))
	b, err := os.ReadFile(good)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(live, b, 0o755))
	return dir, ctl, live, bad
}

// needPIDNamespace skips the test, saying why, unless it can make a PID
// namespace; it returns unshare's path.
func needPIDNamespace(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for a PID namespace")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("needs unshare (util-linux)")
	}
	return unshare
}

// supervisorIn waits (at most 30 s) for the supervisor that unshare (cmd)
// starts as PID 1 of its namespace, and returns its PID out here.
func supervisorIn(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		require.False(t, time.Now().After(deadline), "unshare started no supervisor")
		if c := loadtest.Children(cmd.Process.Pid); len(c) == 1 {
			return c[0]
		}
	}
}
