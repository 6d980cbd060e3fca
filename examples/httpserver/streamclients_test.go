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
	"github.com/stretchr/testify/require"
)

// streamClients are clients of the reference server's /ws and /sse in
// -stream-handoff mode that tolerate nothing: a WebSocket client checks
// that every message it sends is answered once and in order, an SSE client
// that event IDs arrive once and in order; a close, a goodbye or a
// reconnect is an error.
type streamClients struct {
	t       *testing.T
	stop    chan struct{}
	wg      sync.WaitGroup
	clients []*streamClient
}

// streamClient is one of them. err and messages are its goroutine's until
// end has returned.
type streamClient struct {
	kind     string // "ws" or "sse"
	port     string // its local address: one connection throughout
	servedBy string // the PID that opened the stream (X-Pid)
	progress atomic.Int64
	messages int
	err      error
}

func newStreamClients(t *testing.T) *streamClients {
	return &streamClients{t: t, stop: make(chan struct{})}
}

// ws opens a WebSocket client on addr.
func (s *streamClients) ws(ctx context.Context, addr string) *streamClient {
	s.t.Helper()
	conn, resp, err := websocket.DefaultDialer.DialContext(ctx, "ws://"+addr+"/ws", nil)
	require.NoError(s.t, err)
	c := &streamClient{kind: "ws", port: conn.LocalAddr().String(), servedBy: resp.Header.Get("X-Pid")}
	s.clients = append(s.clients, c)
	s.wg.Go(func() {
		defer conn.Close()
		for seq := 1; ; seq++ {
			select {
			case <-s.stop:
				conn.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
				return
			case <-time.After(100 * time.Millisecond):
			}
			want := strconv.Itoa(seq)
			if c.err = conn.WriteMessage(websocket.TextMessage, []byte(want)); c.err != nil {
				return
			}
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, got, err := conn.ReadMessage()
			if err != nil {
				c.err = fmt.Errorf("message %d: %w", seq, err)
				return
			}
			if string(got) != want {
				c.err = fmt.Errorf("message %d answered %q", seq, got)
				return
			}
			c.messages++
			c.progress.Add(1)
		}
	})
	return c
}

// sse opens an SSE client on addr.
func (s *streamClients) sse(addr string) *streamClient {
	s.t.Helper()
	conn, err := net.Dial("tcp", addr)
	require.NoError(s.t, err)
	fmt.Fprintf(conn, "GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	require.NoError(s.t, err)
	require.Equal(s.t, http.StatusOK, resp.StatusCode)
	c := &streamClient{kind: "sse", port: conn.LocalAddr().String(), servedBy: resp.Header.Get("X-Pid")}
	s.clients = append(s.clients, c)
	s.wg.Go(func() {
		defer conn.Close()
		go func() { <-s.stop; conn.SetReadDeadline(time.Now()) }()
		next := 1
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				select {
				case <-s.stop:
				default:
					c.err = fmt.Errorf("after event %d: %w", next-1, err)
				}
				return
			}
			line = strings.TrimSpace(line)
			switch {
			case strings.HasPrefix(line, "id: "):
				if id, _ := strconv.Atoi(line[4:]); id != next {
					c.err = fmt.Errorf("event %d after %d", id, next-1)
					return
				}
				next++
				c.messages++
				c.progress.Add(1)
			case strings.HasPrefix(line, "event:"):
				c.err = fmt.Errorf("told %q after event %d", line, next-1)
				return
			}
		}
	})
	return c
}

// waitProgress waits until every client has made progress, each at most
// 30 s.
func (s *streamClients) waitProgress(what string) {
	s.t.Helper()
	base := make([]int64, len(s.clients))
	for i, c := range s.clients {
		base[i] = c.progress.Load()
	}
	for i, c := range s.clients {
		for deadline := time.Now().Add(30 * time.Second); c.progress.Load() == base[i]; time.Sleep(5 * time.Millisecond) {
			require.False(s.t, time.Now().After(deadline), "%s client %d (served by %s) made no progress %s", c.kind, i, c.servedBy, what)
		}
	}
}

// end stops every client and waits for them; their err and messages may
// be read from then on. Idempotent.
func (s *streamClients) end() []*streamClient {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	s.wg.Wait()
	return s.clients
}
