package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestStreamsHandedBack: with -stream-handoff and a probation, WebSocket
// and SSE streams opened during the window land on the canary for their
// share. When the canary is rolled back, they go back to the old process,
// connection and all, as keep-alive connections do: no close, no goodbye,
// every message answered once and in order, every event ID once and in
// order. And the rolled-back canary, its streams handed back, exits at
// once, not at its drain deadline, so the upgrade's outcome comes at once.
func TestStreamsHandedBack(t *testing.T) {
	const drainTimeout = 20 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "control.sock")
	srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/httpserver", loadtest.Config{Args: []string{
		"-stream-handoff", "-control", sock, "-probation", "20s", "-canary-share", "0.5",
		"-upgrade-timeout", "50s", "-drain-timeout", drainTimeout.String(),
	}})
	old := srv.PID()
	outcome, canary := upgradeToCanary(t, ctx, sock)

	// Streams opened now: half of their connections go to the canary.
	const clients = 20
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var progress [2 * clients]atomic.Int64
	errs := make([]error, 2*clients)
	servedBy := make([]string, 2*clients)
	waitProgress := func(what string) {
		t.Helper()
		var base [2 * clients]int64
		for i := range progress {
			base[i] = progress[i].Load()
		}
		for i := range progress {
			for deadline := time.Now().Add(20 * time.Second); progress[i].Load() == base[i]; time.Sleep(5 * time.Millisecond) {
				require.False(t, time.Now().After(deadline), "client %d (served by %s) made no progress %s", i, servedBy[i], what)
			}
		}
	}
	for i := range clients {
		conn, resp, err := websocket.DefaultDialer.DialContext(ctx, "ws://"+srv.Addr+"/ws", nil)
		require.NoError(t, err)
		servedBy[i] = resp.Header.Get("X-Pid")
		wg.Go(func() {
			defer conn.Close()
			for seq := 1; ; seq++ {
				select {
				case <-stop:
					conn.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
					return
				case <-time.After(50 * time.Millisecond):
				}
				want := strconv.Itoa(seq)
				if errs[i] = conn.WriteMessage(websocket.TextMessage, []byte(want)); errs[i] != nil {
					return
				}
				conn.SetReadDeadline(time.Now().Add(10 * time.Second))
				_, got, err := conn.ReadMessage()
				if err != nil {
					errs[i] = fmt.Errorf("message %d: %w", seq, err)
					return
				}
				if string(got) != want {
					errs[i] = fmt.Errorf("message %d answered %q", seq, got)
					return
				}
				progress[i].Add(1)
			}
		})
	}
	for i := clients; i < 2*clients; i++ {
		conn, err := net.Dial("tcp", srv.Addr)
		require.NoError(t, err)
		fmt.Fprintf(conn, "GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		servedBy[i] = resp.Header.Get("X-Pid")
		wg.Go(func() {
			defer conn.Close()
			go func() { <-stop; conn.SetReadDeadline(time.Now()) }()
			next := 1
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					select {
					case <-stop:
					default:
						errs[i] = fmt.Errorf("after event %d: %w", next-1, err)
					}
					return
				}
				line = strings.TrimSpace(line)
				switch {
				case strings.HasPrefix(line, "id: "):
					if id, _ := strconv.Atoi(line[4:]); id != next {
						errs[i] = fmt.Errorf("event %d after %d", id, next-1)
						return
					}
					next++
					progress[i].Add(1)
				case strings.HasPrefix(line, "event:"):
					errs[i] = fmt.Errorf("told %q after event %d", line, next-1)
					return
				}
			}
		})
	}
	end := sync.OnceFunc(func() {
		close(stop)
		wg.Wait()
	})
	defer end()
	onCanary := map[string]int{}
	for i, pid := range servedBy {
		if pid == strconv.Itoa(canary) {
			onCanary[map[bool]string{true: "ws", false: "sse"}[i < clients]]++
		}
	}
	require.Positive(t, onCanary["ws"], "WebSockets on the canary (served by %v)", servedBy)
	require.Positive(t, onCanary["sse"], "SSE streams on the canary (served by %v)", servedBy)
	waitProgress("on probation")

	// Rolled back (it is told to stop: it leaves, and the old process ends
	// the window): its streams come back.
	require.NoError(t, syscall.Kill(canary, syscall.SIGTERM))
	began := time.Now()
	select {
	case err := <-outcome:
		require.ErrorContains(t, err, "rolled back")
	case <-time.After(drainTimeout + 10*time.Second):
		t.Fatal("no outcome")
	}
	took := time.Since(began)
	t.Logf("%d WebSockets and %d SSE streams on the canary; rolled back, outcome after %v", onCanary["ws"], onCanary["sse"], took.Round(time.Millisecond))
	assert.Less(t, took, drainTimeout/2, "the rolled-back canary, its streams handed back, exits at once")
	for i := 0; i < 1000 && loadtest.Alive(canary); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	require.False(t, loadtest.Alive(canary), "the canary exited")
	waitProgress("after the rollback, on the old process")
	assert.Equal(t, old, srv.PID())
	end()
	for i, err := range errs {
		assert.NoError(t, err, "client %d, served by %s", i, servedBy[i])
	}
}
