package graceful_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestKeepAliveAcrossUpgrades: keep-alive POST and GET workers with Go's
// http.Transport, whose pauses put requests at every point of the drain,
// see no failure through repeated upgrades, over HTTP/1.1, h2c and HTTP/2
// over TLS. (The long form is BenchmarkKeepAliveUpgrades.)
func TestKeepAliveAcrossUpgrades(t *testing.T) {
	const upgrades = 5
	for _, tc := range []struct {
		proto string
		args  []string
	}{
		{"", nil},
		{"h2c", []string{"-h2c"}},
		{"h2", []string{"-tls"}},
	} {
		name := tc.proto
		if name == "" {
			name = "http1"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			h := startHelper(t, tc.args, loadtest.Config{TLS: tc.proto == "h2"})
			load := loadtest.StartLoad(h.Addr, loadtest.Mix{
				KeepAlivePOST: 4, KeepAliveGET: 2, Proto: tc.proto,
				Pause: time.Millisecond, MaxPause: 30 * time.Millisecond,
			})
			for i := range upgrades {
				before, _ := load.Snapshot()
				waitRequests(t, load, before+20)
				u, err := h.Upgrade(context.Background(), 20*time.Second)
				require.NoError(t, err, "upgrade %d", i+1)
				assert.Equal(t, 0, u.ExitCode)
			}
			before, _ := load.Snapshot()
			waitRequests(t, load, before+20)
			stats := load.Stop()
			var report strings.Builder
			stats.Report(&report)
			assert.Zero(t, stats.Failed(), report.String())
			assert.GreaterOrEqual(t, len(stats.PIDs), upgrades, "served by every generation:\n%s", report.String())
		})
	}
}

// rawConn is an HTTP/1.1 client on one TCP connection, so a test controls
// exactly when each request is written.
type rawConn struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawConn {
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	return &rawConn{t: t, c: c, r: bufio.NewReader(c)}
}

func (rc *rawConn) send(path string) {
	_, err := io.WriteString(rc.c, "GET "+path+" HTTP/1.1\r\nHost: test\r\n\r\n")
	require.NoError(rc.t, err)
}

func (rc *rawConn) response() *http.Response {
	resp, err := http.ReadResponse(rc.r, nil)
	require.NoError(rc.t, err)
	_, err = io.ReadAll(resp.Body)
	require.NoError(rc.t, err)
	resp.Body.Close()
	return resp
}

// TestDrainKeepAlive follows single connections through a SIGTERM drain:
// a response that began before the drain leaves its connection usable for
// one more request (net/http's Shutdown would close it right after the
// response, under a client about to reuse it); an idle connection used
// within IdleGrace is answered with "Connection: close"; one that stays
// idle gets a FIN, never a reset.
func TestDrainKeepAlive(t *testing.T) {
	h := startHelper(t, []string{"-idle-grace", "500ms"}, loadtest.Config{})
	straddling := dialRaw(t, h.Addr)
	reused := dialRaw(t, h.Addr)
	idle := dialRaw(t, h.Addr)
	for _, rc := range []*rawConn{reused, idle} {
		rc.send("/")
		assert.Empty(t, rc.response().Header.Get("Connection"), "keep-alive before the drain")
	}
	straddling.send("/slow?ms=400")
	h.waitEvent(h.PID(), evSlowStarted)
	start := time.Now()
	require.NoError(t, h.Signal(syscall.SIGTERM))
	h.waitEvent(h.PID(), evDraining)

	reused.send("/")
	resp := reused.response()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.True(t, resp.Close, "a request during the drain is answered with Connection: close")

	resp = straddling.response()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.False(t, resp.Close, "the handler started before the drain")
	straddling.send("/") // reuse at once, as a client pool does
	resp = straddling.response()
	assert.Equal(t, http.StatusOK, resp.StatusCode, "the straddling connection carried one more request")
	assert.True(t, resp.Close)

	for _, rc := range []*rawConn{reused, straddling} {
		_, err := rc.r.ReadByte()
		assert.ErrorIs(t, err, io.EOF, "closed after Connection: close")
	}
	_, err := idle.r.ReadByte()
	assert.ErrorIs(t, err, io.EOF, "the idle connection is retired with a FIN, not a reset")
	assert.False(t, errors.Is(err, syscall.ECONNRESET))
	assert.GreaterOrEqual(t, time.Since(start), 500*time.Millisecond, "not before IdleGrace")

	code, err := h.WaitExit(context.Background(), h.PID())
	require.NoError(t, err)
	assert.Equal(t, 0, code)
}

// strictClient is what Python's http.client or many SDKs do: one
// connection, reused without checking it is still open, never retried.
type strictClient struct {
	rc       *rawConn
	port     int
	pids     map[string]bool
	failures []string
}

func (sc *strictClient) do(method, path, body string) {
	req := method + " " + path + " HTTP/1.1\r\nHost: test\r\n"
	if body != "" {
		req += "Content-Length: " + strconv.Itoa(len(body)) + "\r\n"
	}
	sc.rc.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(sc.rc.c, req+"\r\n"+body); err != nil {
		sc.failures = append(sc.failures, "write: "+err.Error())
		return
	}
	resp, err := http.ReadResponse(sc.rc.r, nil)
	if err != nil {
		sc.failures = append(sc.failures, fmt.Sprintf("read (port %d): %v", sc.port, err))
		return
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	want := "ok"
	if body != "" {
		want = body
	}
	switch {
	case err != nil:
		sc.failures = append(sc.failures, "body: "+err.Error())
	case string(got) != want:
		sc.failures = append(sc.failures, fmt.Sprintf("body %q, want %q", got, want))
	case resp.Close:
		sc.failures = append(sc.failures, "Connection: close (a strict client would not notice)")
	default:
		sc.pids[resp.Header.Get("X-Pid")] = true
	}
}

// runStrictClients runs n strict clients, each pausing in [minPause,
// maxPause) between requests, through upgrades, and returns them.
func runStrictClients(t *testing.T, h *helper, n, upgrades int, minPause, maxPause time.Duration, post bool) []*strictClient {
	clients := make([]*strictClient, n)
	var done atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range clients {
		rc := dialRaw(t, h.Addr)
		sc := &strictClient{rc: rc, port: rc.c.LocalAddr().(*net.TCPAddr).Port, pids: map[string]bool{}}
		clients[i] = sc
		wg.Add(1)
		go func() {
			defer wg.Done()
			for len(sc.failures) == 0 {
				body := ""
				if post {
					body = strings.Repeat(strconv.Itoa(rand.IntN(10)), 1+rand.IntN(2000))
					sc.do("POST", "/echo", body)
				} else {
					sc.do("GET", "/", "")
				}
				done.Add(1)
				select {
				case <-stop:
					return
				case <-time.After(minPause + rand.N(maxPause-minPause)):
				}
			}
		}()
	}
	defer func() {
		if t.Failed() {
			for i, sc := range clients {
				t.Logf("client %d failures: %v", i, sc.failures)
			}
		}
	}()
	for i := range upgrades {
		waitFor(t, func() bool { return done.Load() >= int64((i+1)*n) })
		u, err := h.Upgrade(context.Background(), 20*time.Second)
		require.NoError(t, err, "upgrade %d", i+1)
		assert.Equal(t, 0, u.ExitCode)
	}
	target := done.Load() + int64(n)
	waitFor(t, func() bool { return done.Load() >= target })
	close(stop)
	wg.Wait()
	for _, sc := range clients {
		assert.Equal(t, sc.port, sc.rc.c.LocalAddr().(*net.TCPAddr).Port)
	}
	return clients
}

// TestHandOffStrictClients: clients that never retry and never check their
// connection keep it idle longer than IdleGrace across 8 upgrades. The
// idle connections are handed to each new process: 0 failures, and the
// same TCP connection is served by many generations. With NoHandOff the
// same clients fail (the close-based drain cannot help them).
func TestHandOffStrictClients(t *testing.T) {
	t.Run("hand-off", func(t *testing.T) {
		t.Parallel()
		h := startHelper(t, []string{"-idle-grace", "200ms"}, loadtest.Config{})
		clients := runStrictClients(t, h, 8, 8, 300*time.Millisecond, 700*time.Millisecond, false)
		for i, sc := range clients {
			assert.Empty(t, sc.failures, "client %d", i)
			assert.GreaterOrEqual(t, len(sc.pids), 3, "client %d: one connection, served by several generations", i)
		}
	})
	t.Run("close-based drain fails them", func(t *testing.T) {
		t.Parallel()
		h := startHelper(t, []string{"-idle-grace", "200ms", "-no-handoff"}, loadtest.Config{})
		clients := make([]*strictClient, 4)
		for i := range clients {
			rc := dialRaw(t, h.Addr)
			clients[i] = &strictClient{rc: rc, pids: map[string]bool{}}
			clients[i].do("GET", "/", "")
			require.Empty(t, clients[i].failures)
		}
		_, err := h.Upgrade(context.Background(), 20*time.Second)
		require.NoError(t, err)
		failed := 0
		for _, sc := range clients {
			sc.do("GET", "/", "")
			if len(sc.failures) > 0 {
				failed++
			}
		}
		assert.Equal(t, len(clients), failed, "idle connections were closed under the clients")
	})
}

// TestHandOffByteIntegrity: clients POST bodies back to back with random
// pauses from 0 to 3 ms, so requests arrive at every instant of a claim,
// through 8 upgrades: every echo is intact, none is lost or duplicated
// (a strict client would see either as a failure), and no connection is
// closed under its client.
func TestHandOffByteIntegrity(t *testing.T) {
	h := startHelper(t, nil, loadtest.Config{})
	clients := runStrictClients(t, h, 12, 8, 0, 3*time.Millisecond, true)
	for i, sc := range clients {
		assert.Empty(t, sc.failures, "client %d", i)
	}
}

// TestHandOffSuccessorDies pins what happens when the new process dies
// right after taking the connections (it has answered one request on each):
// they die with it, as with any crash.
// The old process has already exited (a hand-off is not undone), so each
// client's next request fails at once with EOF or a reset, never hangs,
// and nothing accepts new connections. Supervisors (systemd Restart=,
// Kubernetes) restart the service; graceful cannot.
func TestHandOffSuccessorDies(t *testing.T) {
	h := startHelper(t, nil, loadtest.Config{})
	clients := make([]*strictClient, 4)
	for i := range clients {
		clients[i] = &strictClient{rc: dialRaw(t, h.Addr), pids: map[string]bool{}}
		clients[i].do("GET", "/", "")
		require.Empty(t, clients[i].failures)
	}
	u, err := h.Upgrade(context.Background(), 20*time.Second)
	require.NoError(t, err)
	// The old process has exited: each connection was handed over, not
	// closed, if the successor answers on it.
	for i, sc := range clients {
		sc.do("GET", "/", "")
		require.Empty(t, sc.failures, "client %d", i)
		require.True(t, sc.pids[strconv.Itoa(u.NewPID)], "client %d: served by the successor %d, got %v", i, u.NewPID, sc.pids)
	}
	require.NoError(t, h.Signal(syscall.SIGKILL))
	_, err = h.WaitExit(context.Background(), u.NewPID)
	require.NoError(t, err)
	for i, sc := range clients {
		start := time.Now()
		sc.do("GET", "/", "")
		require.Len(t, sc.failures, 1, "client %d", i)
		assert.Regexp(t, "EOF|reset|broken pipe", sc.failures[0])
		assert.Less(t, time.Since(start), 5*time.Second, "fails at once")
	}
	_, err = net.Dial("tcp", h.Addr)
	assert.ErrorIs(t, err, syscall.ECONNREFUSED)
}
