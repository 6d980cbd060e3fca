package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestContract checks the reference server's public contract: endpoints,
// headers, and the goodbyes its streams get when SIGTERM drains it.
func TestContract(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/httpserver", loadtest.Config{})
	base := "http://" + srv.Addr
	pid := strconv.Itoa(srv.PID())
	c := &http.Client{Timeout: 10 * time.Second}

	resp, body := call(t, c, http.MethodGet, base+"/", "")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "ok", body)
	assert.Equal(t, pid, resp.Header.Get("X-Pid"))

	resp, body = call(t, c, http.MethodPost, base+"/echo", "hello, world")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "hello, world", body)
	assert.Equal(t, pid, resp.Header.Get("X-Pid"))

	start := time.Now()
	resp, _ = call(t, c, http.MethodGet, base+"/slow?ms=50", "")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.GreaterOrEqual(t, time.Since(start), 50*time.Millisecond)
	resp, body = call(t, c, http.MethodGet, base+"/slow?ms=abc", "")
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Contains(t, body, "ms must be")

	for _, path := range []string{"/readyz", "/livez"} {
		resp, body = call(t, c, http.MethodGet, base+path, "")
		assert.Equal(t, http.StatusOK, resp.StatusCode, path)
		assert.Equal(t, "ok\n", body, path)
	}

	// Streams open before the drain.
	sse, err := c.Get(base + "/sse")
	require.NoError(t, err)
	defer sse.Body.Close()
	assert.Equal(t, "text/event-stream", sse.Header.Get("Content-Type"))
	events := bufio.NewScanner(sse.Body)
	require.True(t, events.Scan())
	assert.Equal(t, "data: tick", events.Text())

	ws, _, err := websocket.DefaultDialer.Dial("ws://"+srv.Addr+"/ws", nil)
	require.NoError(t, err)
	defer ws.Close()
	require.NoError(t, ws.WriteMessage(websocket.TextMessage, []byte("ping")))
	_, msg, err := ws.ReadMessage()
	require.NoError(t, err)
	assert.Equal(t, "ping", string(msg))

	// A keep-alive connection, idle when the drain starts.
	keep, err := net.Dial("tcp", srv.Addr)
	require.NoError(t, err)
	defer keep.Close()
	kr := bufio.NewReader(keep)
	getOn(t, keep, kr, "/livez")

	require.NoError(t, srv.Signal(syscall.SIGTERM))

	// SSE: ticks, then the reconnect event, then the end of the stream.
	reconnect := false
	for events.Scan() {
		if events.Text() == "event: reconnect" {
			reconnect = true
		}
	}
	assert.NoError(t, events.Err())
	assert.True(t, reconnect, "SSE stream ended with event: reconnect")

	// The idle connection may carry one more request: readiness is 503 and
	// the response asks the client to close.
	r := getOn(t, keep, kr, "/readyz")
	assert.Equal(t, http.StatusServiceUnavailable, r.StatusCode)
	assert.True(t, r.Close, "Connection: close while draining")

	// WebSocket: close frame 1012.
	_, _, err = ws.ReadMessage()
	assert.True(t, websocket.IsCloseError(err, websocket.CloseServiceRestart), "WebSocket closed with 1012: %v", err)

	code, err := srv.WaitExit(ctx, srv.PID())
	require.NoError(t, err)
	assert.Equal(t, 0, code, "SIGTERM exits 0")
	_, err = os.Stat(srv.PIDFile)
	assert.True(t, os.IsNotExist(err), "PID file removed after a drain without successor")
}

func call(t *testing.T, c *http.Client, method, url, body string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(b)
}

func getOn(t *testing.T, conn net.Conn, r *bufio.Reader, path string) *http.Response {
	t.Helper()
	_, err := io.WriteString(conn, "GET "+path+" HTTP/1.1\r\nHost: test\r\n\r\n")
	require.NoError(t, err)
	resp, err := http.ReadResponse(r, nil)
	require.NoError(t, err)
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

// TestMetrics: after an upgrade, the new process's /metrics counts it, with
// its duration, and its predecessor's drain with the idle connections it
// handed over; -metrics=false serves no /metrics.
func TestMetrics(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/httpserver", loadtest.Config{})
	m, err := loadtest.Scrape(ctx, srv.Addr)
	require.NoError(t, err)
	assert.Equal(t, 1.0, m["graceful_generation"])
	assert.Equal(t, 0.0, m[`graceful_upgrades_total{outcome="succeeded"}`])
	assert.Positive(t, m["process_open_fds"])
	assert.Positive(t, m["go_goroutines"])

	for range 3 { // idle keep-alive connections, handed over at the upgrade
		c, err := net.Dial("tcp", srv.Addr)
		require.NoError(t, err)
		defer c.Close()
		getOn(t, c, bufio.NewReader(c), "/")
	}
	_, err = srv.Upgrade(ctx, time.Minute)
	require.NoError(t, err)
	// The old process reported its drain before it exited; the new one
	// takes it in its own time.
	for i := 0; ; i++ {
		m, err = loadtest.Scrape(ctx, srv.Addr)
		require.NoError(t, err)
		if m["graceful_drains_total"] == 1 || i == 200 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	assert.Equal(t, 2.0, m["graceful_generation"])
	assert.Equal(t, 1.0, m[`graceful_upgrades_total{outcome="succeeded"}`])
	assert.Equal(t, 0.0, m[`graceful_upgrades_total{outcome="failed"}`])
	assert.Equal(t, 1.0, m[`graceful_upgrade_duration_seconds_count{outcome="succeeded"}`])
	assert.Positive(t, m[`graceful_upgrade_duration_seconds_sum{outcome="succeeded"}`])
	assert.Equal(t, 1.0, m["graceful_drains_total"])
	assert.Equal(t, 1.0, m["graceful_drain_duration_seconds_count"])
	assert.GreaterOrEqual(t, m[`graceful_drain_connections_total{fate="handed"}`], 3.0)
	assert.Equal(t, 0.0, m[`graceful_drain_connections_total{fate="forced"}`])

	off := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/httpserver", loadtest.Config{Args: []string{"-metrics=false"}})
	_, err = loadtest.Scrape(ctx, off.Addr)
	assert.ErrorContains(t, err, "404")
}

// TestLeakGate is the short form of BenchmarkLeakGate: 20 upgrades under
// steady mixed load lose no request, leave no process behind, and the
// serving process holds, once the load is gone, no more descriptors or
// goroutines than the second generation did before it (the first has no
// predecessor to receive from, so the second is the steady state).
func TestLeakGate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/httpserver", loadtest.Config{})
	first := srv.PID()
	_, err := srv.Upgrade(ctx, time.Minute)
	require.NoError(t, err)
	srv.Follow()
	before, err := settled(ctx, srv, loadtest.Resources{FDs: 1 << 30, Goroutines: 1 << 30})
	require.NoError(t, err)

	load := loadtest.StartLoad(srv.Addr, loadtest.Mix{KeepAliveGET: 4, KeepAlivePOST: 2, FreshGET: 2, Slow: 2, SSE: 2, WS: 2})
	pids := []int{first, srv.PID()}
	for i := range 20 {
		u, err := srv.Upgrade(ctx, time.Minute)
		require.NoError(t, err, "upgrade %d", i)
		assert.Equal(t, 0, u.ExitCode)
		srv.Follow()
		pids = append(pids, u.NewPID)
		r, err := loadtest.Measure(ctx, u.NewPID, srv.Addr)
		require.NoError(t, err)
		t.Logf("generation %d under load: %d descriptors, %d goroutines, %d threads, %d KiB", i+3, r.FDs, r.Goroutines, r.Threads, r.RSSKiB)
	}
	stats := load.Stop()
	assert.Zero(t, stats.Failed(), "failed requests: %v %v", stats.Failures, stats.Samples)

	after, err := settled(ctx, srv, before)
	assert.NoError(t, err, "the last generation, with the load gone, holds more than the second did: %+v, before %+v", after, before)
	for _, pid := range pids[:len(pids)-1] {
		assert.False(t, loadtest.Alive(pid), "generation %d is still running", pid)
	}
}

// settled waits until the serving process holds at most what limit says,
// give or take the scrape's own connection (two descriptors, three
// goroutines), and returns what it holds; an error if it never does within
// 10 s. Closed clients take a moment to be seen closed.
func settled(ctx context.Context, srv *loadtest.Server, limit loadtest.Resources) (loadtest.Resources, error) {
	var r loadtest.Resources
	for deadline := time.Now().Add(10 * time.Second); ; {
		var err error
		r, err = loadtest.Measure(ctx, srv.PID(), srv.Addr)
		if err != nil {
			return r, err
		}
		if r.FDs <= limit.FDs+2 && r.Goroutines <= limit.Goroutines+3 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if r.FDs > limit.FDs+2 || r.Goroutines > limit.Goroutines+3 {
		return r, fmt.Errorf("holds %d descriptors and %d goroutines", r.FDs, r.Goroutines)
	}
	return r, nil
}

// TestBadBuilds: the build-time variables make a bad build without editing
// code: a share of 500s, added latency, a panic after serving; a value that
// does not parse stops the server with an error naming it.
func TestBadBuilds(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const pkg = "github.com/graceful-go/graceful/examples/httpserver"
	start := func(t *testing.T, ldflags string) (*loadtest.Server, error) {
		dir := t.TempDir()
		bin, err := loadtest.BuildWith(ctx, dir, pkg, false, ldflags)
		require.NoError(t, err)
		logs, err := os.Create(filepath.Join(dir, "server.log"))
		require.NoError(t, err)
		t.Cleanup(func() { logs.Close() })
		srv, err := loadtest.Start(ctx, loadtest.Config{Bin: bin, Dir: dir, Logs: logs})
		if srv != nil {
			t.Cleanup(srv.Kill)
		}
		if err != nil {
			b, _ := os.ReadFile(logs.Name())
			return nil, fmt.Errorf("%w: %s", err, b)
		}
		return srv, nil
	}

	t.Run("failRate and extraLatency", func(t *testing.T) {
		srv, err := start(t, "-X main.version=v2 -X main.failRate=0.5 -X main.extraLatency=50ms")
		require.NoError(t, err)
		c := &http.Client{Timeout: 10 * time.Second}
		failed := 0
		const n = 100
		for range n {
			began := time.Now()
			resp, _ := call(t, c, http.MethodGet, "http://"+srv.Addr+"/", "")
			assert.GreaterOrEqual(t, time.Since(began), 50*time.Millisecond)
			assert.Equal(t, "v2", resp.Header.Get("X-Version"))
			if resp.StatusCode == http.StatusInternalServerError {
				failed++
			} else {
				assert.Equal(t, http.StatusOK, resp.StatusCode)
			}
		}
		assert.InDelta(t, n/2, failed, 25, "about half answered 500")
		resp, _ := call(t, c, http.MethodGet, "http://"+srv.Addr+"/livez", "")
		assert.Equal(t, http.StatusOK, resp.StatusCode, "only GET / and POST /echo fail")
	})

	t.Run("panicAfter", func(t *testing.T) {
		srv, err := start(t, "-X main.panicAfter=300ms")
		require.NoError(t, err)
		code, err := srv.WaitExit(ctx, srv.PID())
		require.NoError(t, err)
		assert.Equal(t, 2, code, "a Go panic exits 2")
	})

	t.Run("bad value", func(t *testing.T) {
		_, err := start(t, "-X main.failRate=lots")
		require.Error(t, err)
		assert.Contains(t, err.Error(), `build variable main.failRate=`)
		assert.Contains(t, err.Error(), `want a fraction from 0 to 1`)
	})
}
