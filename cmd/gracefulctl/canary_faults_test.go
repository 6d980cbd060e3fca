package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/control"
	"github.com/graceful-go/graceful/internal/loadtest"
)

// startCanaryServer starts the reference server bin with a control socket
// and a probation of window at share, and returns it with its control
// socket and log path; the test's cleanup kills every generation.
func startCanaryServer(t *testing.T, ctx context.Context, bin string, window time.Duration, share string, args ...string) (*loadtest.Server, string, string) {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "control.sock")
	logPath := filepath.Join(dir, "server.log")
	logs, err := os.Create(logPath)
	require.NoError(t, err)
	args = append([]string{"-control", sock, "-upgrade-timeout", "30s", "-probation", window.String(), "-canary-share", share}, args...)
	srv, err := loadtest.Start(ctx, loadtest.Config{Bin: bin, Dir: dir, Logs: logs, Args: args})
	require.NoError(t, err)
	t.Cleanup(func() {
		srv.Kill()
		logs.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("server logs:\n%s", b)
		}
	})
	return srv, sock, logPath
}

// ctlRun runs gracefulctl with args and returns its output and exit code.
func ctlRun(ctx context.Context, ctl string, args ...string) (string, int, error) {
	out, err := exec.CommandContext(ctx, ctl, args...).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode(), nil
	}
	return string(out), 0, err
}

// waitServing waits until the process at sock is pid and serving, at most
// 20 s, and returns when it first saw it so.
func waitServing(t *testing.T, ctx context.Context, sock string, pid int) time.Time {
	t.Helper()
	var last string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		st, err := control.Details(ctx, sock)
		if err == nil && st.PID == pid && st.Phase == graceful.PhaseServing {
			return time.Now()
		}
		last = "pid " + strconv.Itoa(st.PID) + " " + st.Phase.String()
		if err != nil {
			last = err.Error()
		}
	}
	t.Fatalf("pid %d is not serving at %s after 20 s (last: %s)", pid, sock, last)
	return time.Time{}
}

// TestCanaryJudgeKilled: the old process, which judges the canary, is
// SIGKILLed during the probation. The canary holds the listeners: it must
// become the serving process (unjudged, and it says so), with its PID
// file, instead of draining and leaving nothing listening. No connection is
// refused; what the killed process had in flight dies with it, and every
// request after the canary took over is answered. The orphan can upgrade
// again.
func TestCanaryJudgeKilled(t *testing.T) {
	const window = 4 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, ctl, bin := buildTools(t, ctx)
	srv, sock, _ := startCanaryServer(t, ctx, bin, window, "0.5")
	old := srv.PID()
	load := loadtest.StartLoad(srv.Addr, loadtest.Mix{KeepAliveGET: 8, FreshGET: 4})
	defer load.Stop()
	upgraded := make(chan string, 1)
	go func() {
		out, _, _ := ctlRun(ctx, ctl, "-socket", sock, "upgrade")
		upgraded <- out
	}()
	canary := waitCanary(t, ctx, sock)
	waitRequests(t, load, 200) // the canary serves its share
	require.NoError(t, syscall.Kill(old, syscall.SIGKILL))
	_, err := srv.WaitExit(ctx, old)
	require.NoError(t, err)
	t.Logf("upgrade command, its server killed: %s", <-upgraded)

	servingAt := waitServing(t, ctx, sock, canary)
	assert.Equal(t, canary, loadtest.ReadPIDFile(srv.PIDFile), "the PID file names the canary")
	srv.Follow()
	waitRequests(t, load, 500)
	st := load.Stop()
	t.Logf("requests %d, failures %v %v", st.Requests, st.Failures, st.Samples)
	assert.Zero(t, st.Failures["refused"], "no connection refused: %v", st.Samples)
	after, failedAfter := 0, 0
	for _, o := range st.Timeline {
		if o.At.Before(servingAt) {
			continue
		}
		after++
		if o.Failed {
			failedAfter++
		} else {
			assert.Equal(t, strconv.Itoa(canary), o.PID, "answered by the canary")
		}
	}
	assert.Positive(t, after)
	assert.Zero(t, failedAfter, "requests that failed once the canary served alone")

	// It is a whole server: it upgrades again (a probation judged on
	// traffic of its own), and nobody fails.
	load = loadtest.StartLoad(srv.Addr, loadtest.Mix{KeepAliveGET: 8, FreshGET: 4})
	defer load.Stop()
	waitRequests(t, load, 100)
	out, code, err := ctlRun(ctx, ctl, "-socket", sock, "upgrade")
	require.NoError(t, err)
	assert.Equal(t, 0, code, out)
	st = load.Stop()
	assert.Zero(t, st.Failed(), "%v %v", st.Failures, st.Samples)
	srv.Follow()
	assert.NotEqual(t, canary, srv.PID())
}

// TestCanaryDiesIdleConnectionsLive: a canary that dies (SIGKILL: a
// panic, the OOM killer) while it holds idle keep-alive connections. The
// old process kept a duplicate of every connection it handed over, and the
// board says which were idle: it serves them, so that the clients'
// next requests, on the same connections, are answered. Only a request in
// flight on the canary as it died may be lost; here none is.
func TestCanaryDiesIdleConnectionsLive(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, ctl, bin := buildTools(t, ctx)
	srv, sock, _ := startCanaryServer(t, ctx, bin, 20*time.Second, "0.5")
	old := srv.PID()
	upgraded := make(chan string, 1)
	go func() {
		out, _, _ := ctlRun(ctx, ctl, "-socket", sock, "upgrade")
		upgraded <- out
	}()
	canary := waitCanary(t, ctx, sock)

	// Keep-alive clients, each with one request answered: half of their
	// connections are the canary's, idle once answered.
	const clients = 40
	conns := make([]net.Conn, clients)
	readers := make([]*bufio.Reader, clients)
	ask := func(i int) (string, error) {
		conns[i].SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := fmt.Fprintf(conns[i], "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			return "", err
		}
		resp, err := http.ReadResponse(readers[i], nil)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		if _, err := io.Copy(io.Discard, resp.Body); err != nil {
			return "", err
		}
		if resp.StatusCode != http.StatusOK {
			return "", fmt.Errorf("status %d", resp.StatusCode)
		}
		return resp.Header.Get("X-Pid"), nil
	}
	onCanary := 0
	for i := range conns {
		c, err := net.Dial("tcp", srv.Addr)
		require.NoError(t, err)
		defer c.Close()
		conns[i], readers[i] = c, bufio.NewReader(c)
		pid, err := ask(i)
		require.NoError(t, err, "client %d", i)
		if pid == strconv.Itoa(canary) {
			onCanary++
		}
	}
	require.Positive(t, onCanary, "connections on the canary")
	// A response the client has read may precede, by microseconds, the
	// canary's marking its connection idle: wait until the board says so
	// of every connection it holds, then kill it.
	waitBoardIdle(t, old, onCanary)

	require.NoError(t, syscall.Kill(canary, syscall.SIGKILL))
	select {
	case out := <-upgraded:
		assert.Contains(t, out, "rolled back: the new process died")
	case <-ctx.Done():
		t.Fatal("no outcome")
	}
	lost := 0
	for i := range conns {
		pid, err := ask(i)
		if err != nil {
			lost++
			t.Logf("client %d: %v", i, err)
			continue
		}
		assert.Equal(t, strconv.Itoa(old), pid, "client %d", i)
	}
	t.Logf("%d of %d idle connections were the canary's when it died; %d lost", onCanary, clients, lost)
	assert.Zero(t, lost, "idle connections lost with the canary")
	assert.Equal(t, old, loadtest.ReadPIDFile(srv.PIDFile))
}

// waitBoardIdle waits, at most 10 s, until the probation board of the old
// process pid (the memfd it shares with its canary, read through /proc)
// has n connections registered, every one of them idle.
func waitBoardIdle(t *testing.T, pid, n int) {
	t.Helper()
	const slotSize, idle = 16, 1
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(dir)
	require.NoError(t, err)
	path := ""
	for _, fd := range fds {
		if l, _ := os.Readlink(filepath.Join(dir, fd.Name())); strings.HasPrefix(l, "/memfd:graceful-board") {
			path = filepath.Join(dir, fd.Name())
		}
	}
	require.NotEmpty(t, path, "the old process holds no probation board")
	var registered, idled int
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		registered, idled = int(binary.NativeEndian.Uint32(b)), 0
		for i := 1; i <= registered && (i+1)*slotSize <= len(b); i++ {
			if binary.NativeEndian.Uint32(b[i*slotSize+8:]) == idle {
				idled++
			}
		}
		if registered >= n && idled == registered {
			return
		}
	}
	t.Fatalf("the board has %d connections, %d idle; want %d, all idle", registered, idled, n)
}
