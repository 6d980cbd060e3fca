package bench

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
)

// BenchmarkStreamsAcrossUpgrades: 100 WebSocket clients (a message every
// 50 ms, each answer checked) and 100 SSE clients through 10 upgrades of
// the reference server, with its goodbyes (the default) and with
// -stream-handoff. Reported per upgrade: reconnects, WebSocket messages
// sent and never answered, and SSE events the clients saw twice or never
// (by ID, with -stream-handoff; the goodbye stream has no IDs).
//
//	go test -run '^$' -bench BenchmarkStreamsAcrossUpgrades -benchtime 1x ./internal/bench
func BenchmarkStreamsAcrossUpgrades(b *testing.B) {
	const clients, upgrades = 100, 10
	for _, mode := range []string{"goodbye", "handoff"} {
		b.Run(mode, func(b *testing.B) {
			for range b.N {
				var args []string
				if mode == "handoff" {
					args = []string{"-stream-handoff"}
				}
				srv := startReference(b, args, false)
				var reconnects, lost, badEvents, messages atomic.Int64
				stop := make(chan struct{})
				var wg sync.WaitGroup
				for range clients {
					wg.Go(func() { wsClient(srv.Addr, stop, &reconnects, &lost, &messages) })
					wg.Go(func() { sseClient(srv.Addr, stop, &reconnects, &badEvents) })
				}
				time.Sleep(500 * time.Millisecond)
				for i := range upgrades {
					if _, err := srv.Upgrade(context.Background(), time.Minute); err != nil {
						b.Fatalf("upgrade %d: %v", i+1, err)
					}
				}
				time.Sleep(500 * time.Millisecond)
				close(stop)
				wg.Wait()
				b.Logf("%s: %d upgrades, %d clients: %d reconnects, %d WebSocket messages lost of %d, %d SSE events repeated or missed",
					mode, upgrades, 2*clients, reconnects.Load(), lost.Load(), messages.Load(), badEvents.Load())
				b.ReportMetric(float64(reconnects.Load())/upgrades, "reconnects/upgrade")
				b.ReportMetric(float64(lost.Load())/upgrades, "lost-messages/upgrade")
				b.ReportMetric(float64(badEvents.Load()), "bad-events")
			}
		})
	}
}

// wsClient sends a numbered message every 50 ms and reads its echo; at a
// close it counts the message left unanswered and reconnects.
func wsClient(addr string, stop <-chan struct{}, reconnects, lost, messages *atomic.Int64) {
	for first := true; ; first = false {
		conn, _, err := websocket.DefaultDialer.Dial("ws://"+addr+"/ws", nil)
		if err != nil {
			if !retry(stop) {
				return
			}
			continue
		}
		if !first {
			reconnects.Add(1)
		}
		for seq := 1; ; seq++ {
			select {
			case <-stop:
				conn.Close()
				return
			case <-time.After(50 * time.Millisecond):
			}
			if conn.WriteMessage(websocket.TextMessage, []byte(strconv.Itoa(seq))) != nil {
				break
			}
			messages.Add(1)
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, got, err := conn.ReadMessage(); err != nil || string(got) != strconv.Itoa(seq) {
				lost.Add(1)
				break
			}
		}
		conn.Close()
	}
}

// sseClient reads the event stream; at its end it reconnects. With IDs, it
// counts those repeated or skipped.
func sseClient(addr string, stop <-chan struct{}, reconnects, bad *atomic.Int64) {
	last := 0
	for first := true; ; first = false {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			if !retry(stop) {
				return
			}
			continue
		}
		if !first {
			reconnects.Add(1)
		}
		go func() { <-stop; conn.SetReadDeadline(time.Now()) }()
		// Connection: close, so that the stream's end is the connection's.
		fmt.Fprintf(conn, "GET /sse HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
		br := bufio.NewReader(conn)
		if resp, err := http.ReadResponse(br, nil); err == nil && resp.StatusCode == http.StatusOK {
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					break
				}
				if id, ok := strings.CutPrefix(strings.TrimSpace(line), "id: "); ok {
					n, _ := strconv.Atoi(id)
					if last != 0 && n != last+1 {
						bad.Add(1)
					}
					last = n
				}
			}
		}
		conn.Close()
		select {
		case <-stop:
			return
		default:
		}
	}
}

// retry waits a moment before a client dials again; false once stopped.
func retry(stop <-chan struct{}) bool {
	select {
	case <-stop:
		return false
	case <-time.After(20 * time.Millisecond):
		return true
	}
}
