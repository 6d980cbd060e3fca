package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestStreamHandOff: with -stream-handoff, 200 WebSocket and 200 SSE
// clients stay on their connections through 20 upgrades: no close, no
// reconnect, the same client port throughout, every WebSocket message
// answered exactly once and in order, every SSE event ID delivered once
// and in order.
func TestStreamHandOff(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/httpserver", loadtest.Config{Args: []string{"-stream-handoff"}})
	const clients, upgrades = 200, 20
	stop := make(chan struct{})
	var wg sync.WaitGroup
	type result struct {
		kind     string
		port     string
		messages int // WebSocket echoes checked, or SSE events
		err      error
	}
	results := make(chan result, 2*clients)
	// progress counts each client's messages as they are checked, so that
	// the test can wait until every stream has made some.
	var progress [2 * clients]atomic.Int64
	waitProgress := func(what string) {
		t.Helper()
		var base [2 * clients]int64
		for i := range progress {
			base[i] = progress[i].Load()
		}
		for i := range progress {
			for deadline := time.Now().Add(30 * time.Second); progress[i].Load() == base[i]; time.Sleep(5 * time.Millisecond) {
				require.False(t, time.Now().After(deadline), "client %d made no progress %s", i, what)
			}
		}
	}

	for i := range clients {
		conn, _, err := websocket.DefaultDialer.DialContext(ctx, "ws://"+srv.Addr+"/ws", nil)
		require.NoError(t, err)
		wg.Go(func() {
			defer conn.Close()
			r := result{kind: "ws", port: conn.LocalAddr().String()}
			defer func() { results <- r }()
			for seq := 1; ; seq++ {
				select {
				case <-stop:
					conn.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
					return
				case <-time.After(100 * time.Millisecond):
				}
				want := strconv.Itoa(seq)
				if r.err = conn.WriteMessage(websocket.TextMessage, []byte(want)); r.err != nil {
					return
				}
				conn.SetReadDeadline(time.Now().Add(10 * time.Second))
				_, got, err := conn.ReadMessage()
				if err != nil {
					r.err = fmt.Errorf("message %d: %w", seq, err)
					return
				}
				if string(got) != want {
					r.err = fmt.Errorf("message %d answered %q", seq, got)
					return
				}
				r.messages++
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
		wg.Go(func() {
			defer conn.Close()
			r := result{kind: "sse", port: conn.LocalAddr().String()}
			defer func() { results <- r }()
			go func() { <-stop; conn.SetReadDeadline(time.Now()) }()
			next := 1
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					select {
					case <-stop:
					default:
						r.err = fmt.Errorf("after event %d: %w", next-1, err)
					}
					return
				}
				line = strings.TrimSpace(line)
				switch {
				case strings.HasPrefix(line, "id: "):
					if id, _ := strconv.Atoi(line[4:]); id != next {
						r.err = fmt.Errorf("event %d after %d", id, next-1)
						return
					}
					next++
					r.messages++
					progress[i].Add(1)
				case strings.HasPrefix(line, "event:"):
					r.err = fmt.Errorf("told %q after event %d", line, next-1)
					return
				}
			}
		})
	}

	waitProgress("before the upgrades")
	pids := []int{srv.PID()}
	for i := range upgrades {
		u, err := srv.Upgrade(ctx, time.Minute)
		require.NoError(t, err, "upgrade %d", i+1)
		// Its streams handed over, the old process exits at once, not at
		// its drain deadline (30 s).
		assert.Less(t, u.OldExit, 5*time.Second, "upgrade %d", i+1)
		pids = append(pids, u.NewPID)
	}
	waitProgress("on the last process")
	close(stop)
	wg.Wait()
	close(results)
	counts := map[string]int{}
	ports := map[string]bool{}
	for r := range results {
		assert.NoError(t, r.err, "%s client %s", r.kind, r.port)
		assert.False(t, ports[r.port], "one connection per client")
		ports[r.port] = true
		counts[r.kind] += r.messages
	}
	assert.Len(t, ports, 2*clients)
	t.Logf("%d upgrades (PIDs %v): %d WebSocket echoes and %d SSE events checked, on the same %d connections", upgrades, pids, counts["ws"], counts["sse"], len(ports))
	assert.Positive(t, counts["ws"])
	assert.Positive(t, counts["sse"])
}
