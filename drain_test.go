package graceful_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
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
	h.logs.waitLog(t, "slow request started")
	start := time.Now()
	require.NoError(t, h.Signal(syscall.SIGTERM))
	h.logs.waitLog(t, `msg=draining`)

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
