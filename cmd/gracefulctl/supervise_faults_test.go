//go:build linux

package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// notifySocketOf returns the NOTIFY_SOCKET in pid's environment.
func notifySocketOf(t *testing.T, pid int) string {
	t.Helper()
	env, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	require.NoError(t, err)
	for kv := range bytes.SplitSeq(env, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("NOTIFY_SOCKET=")); ok {
			return string(v)
		}
	}
	t.Fatalf("no NOTIFY_SOCKET in the environment of %d", pid)
	return ""
}

// waitGone waits until pid has exited (or is a zombie), at most d.
func waitGone(pid int, d time.Duration) bool {
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if !loadtest.Alive(pid) {
			return true
		}
	}
	return false
}

// slowInFlight sends GET /slow?ms=ms on a connection of its own, once the
// server has accepted it (a first request answered), and returns when the
// request is written; the channel receives the status code (0: error).
func slowInFlight(ctx context.Context, t *testing.T, addr string, ms int) <-chan int {
	t.Helper()
	answer, sent := make(chan int, 1), make(chan struct{}, 1)
	go func() {
		client := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{}}
		defer client.CloseIdleConnections()
		if resp, err := client.Get("http://" + addr + "/"); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		trace := &httptrace.ClientTrace{WroteRequest: func(httptrace.WroteRequestInfo) { sent <- struct{}{} }}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodGet, "http://"+addr+"/slow?ms="+strconv.Itoa(ms), nil)
		resp, err := client.Do(req)
		if err != nil {
			t.Logf("in-flight request: %v", err)
			answer <- 0
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		answer <- resp.StatusCode
	}()
	select {
	case <-sent:
	case <-time.After(30 * time.Second):
		t.Fatal("the slow request was never sent")
	}
	return answer
}

// TestSuperviseNotifyFlood (issue 20 item 12): datagrams from another user
// flooding the supervisor's notify socket (an abstract socket anyone may
// send to) neither wedge it nor delay what it does: with its queue kept
// full, SIGHUP is still forwarded (a new generation serves) and SIGTERM
// still stops the service. The flood is sent as uid 65534 with the test's
// PID (root may name them in SCM_CREDENTIALS), so the kernel reports a
// stranger.
func TestSuperviseNotifyFlood(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to send as another user")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.NoError(t, loadtest.BecomeSubreaper())
	dir, ctl, server := buildTools(t, ctx)
	sup, exited, _, pidfile := startSupervised(t, ctx, dir, ctl, server)
	first := loadtest.ReadPIDFile(pidfile)
	defer killGroupOf(first)()
	name := notifySocketOf(t, first)

	var sent atomic.Int64
	stop := make(chan struct{})
	var flooders sync.WaitGroup
	defer func() {
		close(stop)
		flooders.Wait()
	}()
	cred := unix.UnixCredentials(&unix.Ucred{Pid: int32(os.Getpid()), Uid: 65534, Gid: 65534})
	for range 4 {
		// Blocking sends (the queue stays full), each bounded so that the
		// flood notices stop.
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		require.NoError(t, err)
		require.NoError(t, unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Usec: 100_000}))
		flooders.Add(1)
		go func() {
			defer flooders.Done()
			defer unix.Close(fd)
			to := &unix.SockaddrUnix{Name: name}
			for {
				select {
				case <-stop:
					return
				default:
				}
				switch err := unix.Sendmsg(fd, []byte("MAINPID=1\nSTATUS=flood"), cred, to, 0); err {
				case nil:
					sent.Add(1)
				case unix.EAGAIN, unix.EINTR:
				default:
					return // the supervisor is gone
				}
			}
		}()
	}
	floodStart := time.Now()
	for deadline := time.Now().Add(30 * time.Second); sent.Load() < 20000; time.Sleep(10 * time.Millisecond) {
		require.False(t, time.Now().After(deadline), "the flood did not get going: %d sent", sent.Load())
	}
	t.Logf("the flood: 20,000 datagrams in %v", time.Since(floodStart).Round(time.Millisecond))

	for i := range 3 {
		gen := loadtest.ReadPIDFile(pidfile)
		require.NoError(t, sup.Process.Signal(syscall.SIGHUP))
		for deadline := time.Now().Add(30 * time.Second); loadtest.ReadPIDFile(pidfile) == gen; time.Sleep(10 * time.Millisecond) {
			require.False(t, time.Now().After(deadline), "upgrade %d under the flood: SIGHUP never reached pid %d (%d datagrams sent)", i, gen, sent.Load())
		}
		// The old generation exits and the new one is reparented to the
		// supervisor: only then may the next upgrade start.
		onlyChildBut(t, fmt.Sprintf("upgrade %d", i), sup.Process.Pid, gen)
	}
	require.NoError(t, sup.Process.Signal(syscall.SIGTERM))
	select {
	case code := <-exited:
		assert.Equal(t, 0, code)
	case <-time.After(60 * time.Second):
		t.Fatalf("SIGTERM under the flood: the supervisor still runs (%d datagrams sent)", sent.Load())
	}
	t.Logf("%d datagrams sent by the flood", sent.Load())
}

// TestSuperviseKilled (issue 20 item 14): SIGKILL of the supervisor does
// not leave the server running unsupervised: its warden sends the server's
// process group SIGTERM, so the server drains (a request in flight is
// answered) and exits; a new supervisor with the same command then starts
// cleanly, control socket included.
func TestSuperviseKilled(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.NoError(t, loadtest.BecomeSubreaper())
	dir, ctl, server := buildTools(t, ctx)
	addr, err := loadtest.FreeAddr()
	require.NoError(t, err)
	pidfile, sock := filepath.Join(dir, "server.pid"), filepath.Join(dir, "control.sock")
	args := []string{"supervise", "--", server, "-addr", addr, "-pidfile", pidfile, "-control", sock}

	sup := exec.Command(ctl, args...)
	exited := startWatched(t, sup)
	require.NoError(t, loadtest.WaitReady(ctx, addr))
	srv := loadtest.ReadPIDFile(pidfile)
	defer killGroupOf(srv)()
	answer := slowInFlight(ctx, t, addr, 1500)

	require.NoError(t, sup.Process.Kill())
	assert.Equal(t, -1, <-exited, "killed")
	require.True(t, waitGone(srv, 60*time.Second), "the server (pid %d) outlives its supervisor, killed", srv)
	assert.Equal(t, http.StatusOK, <-answer, "the request in flight when the supervisor was killed")

	again := exec.Command(ctl, args...)
	exited = startWatched(t, again)
	require.NoError(t, loadtest.WaitReady(ctx, addr))
	defer killGroupOf(loadtest.ReadPIDFile(pidfile))()
	out, err := exec.CommandContext(ctx, ctl, "-socket", sock, "status").CombinedOutput()
	require.NoError(t, err, "status of the new server: %s", out)
	require.NoError(t, again.Process.Signal(syscall.SIGTERM))
	select {
	case code := <-exited:
		assert.Equal(t, 0, code)
	case <-time.After(60 * time.Second):
		t.Fatal("the new supervisor did not exit")
	}
}

// TestSuperviseForkingCommand (issue 20 item 15): a server command that
// starts the server in the background and exits 0 before it is ready
// (sh -c 'server & exit 0') is followed: the process it left behind, which
// declares itself ready, becomes the main process (its READY=1 relayed),
// is stopped by the supervisor's SIGTERM, and the supervisor exits with
// its status, never 0 with the service still running.
func TestSuperviseForkingCommand(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.NoError(t, loadtest.BecomeSubreaper())
	dir, ctl, server := buildTools(t, ctx)
	ns := listenNotify(t)
	addr, err := loadtest.FreeAddr()
	require.NoError(t, err)
	pidfile := filepath.Join(dir, "server.pid")
	sup := exec.Command(ctl, "supervise", "--", "sh", "-c", `"$0" "$@" & exit 0`, server, "-addr", addr, "-pidfile", pidfile)
	sup.Env = append(os.Environ(), "NOTIFY_SOCKET="+ns.path)
	exited := startWatched(t, sup)
	require.NoError(t, loadtest.WaitReady(ctx, addr))
	srv := loadtest.ReadPIDFile(pidfile)
	defer syscall.Kill(srv, syscall.SIGKILL)
	ns.waitFor(t, 0, "READY=1")
	for _, m := range ns.all() {
		assert.Equal(t, sup.Process.Pid, m.pid, "relayed by the supervisor: %q", m.text)
	}

	require.NoError(t, sup.Process.Signal(syscall.SIGTERM))
	select {
	case code := <-exited:
		assert.Equal(t, 0, code, "the server's own status")
		assert.False(t, loadtest.Alive(srv), "the supervisor exited with the server (pid %d) still running", srv)
	case <-time.After(60 * time.Second):
		t.Fatal("the supervisor did not exit")
	}
}

// TestSuperviseDrainingGenerationPID1 (issue 20 item 13): as PID 1 of a PID
// namespace, when a new generation dies while the old one still drains,
// the supervisor waits for the old one's drain before it exits (its exit
// would make the kernel kill every process of the namespace): the two
// requests in flight on the old generation, 8 s each, are answered, and
// it exits 1.
func TestSuperviseDrainingGenerationPID1(t *testing.T) {
	unshare := needPIDNamespace(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	require.NoError(t, loadtest.BecomeSubreaper())
	dir, ctl, live, bad := buildPanicking(t, ctx)
	addr, err := loadtest.FreeAddr()
	require.NoError(t, err)
	pidfile := filepath.Join(dir, "server.pid")
	cmd := exec.Command(unshare, "--pid", "--mount-proc", "--fork", "--kill-child", "--", ctl, "supervise", "--", live, "-addr", addr, "-pidfile", pidfile, "-drain-timeout", "60s")
	exited := startWatched(t, cmd)
	sup := supervisorIn(t, cmd)
	require.NoError(t, loadtest.WaitReady(ctx, addr))
	old := onlyChildBut(t, "start-up", sup, 0)

	answers := []<-chan int{slowInFlight(ctx, t, addr, 8000), slowInFlight(ctx, t, addr, 8000)}
	b, err := os.ReadFile(bad)
	require.NoError(t, err)
	require.NoError(t, loadtest.WriteExecutable(live, bytes.NewReader(b)))
	start := time.Now()
	require.NoError(t, syscall.Kill(sup, syscall.SIGHUP))
	for i, a := range answers {
		assert.Equal(t, http.StatusOK, <-a, "request %d in flight on the draining generation", i)
	}
	select {
	case code := <-exited:
		assert.Equal(t, 1, code, "the serving generation died")
		assert.False(t, loadtest.Alive(old))
	case <-time.After(60 * time.Second):
		t.Fatal("the supervisor runs on with no server")
	}
	t.Logf("exited %v after the SIGHUP", time.Since(start).Round(time.Millisecond))
}
