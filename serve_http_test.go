package graceful

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestDecideDrain tables the per-connection rule of the keep-alive
// retirement.
func TestDecideDrain(t *testing.T) {
	drainStart := time.Unix(1000, 0)
	grace, arrival := time.Second, 5*time.Second
	before, after := drainStart.Add(-time.Hour), drainStart.Add(300*time.Millisecond)
	cases := []struct {
		name    string
		c       connView
		handoff bool
		want    drainAction
		at      time.Time
	}{
		{"HTTP/2 is drained by GOAWAY", connView{h2: true, http: http.StateIdle}, false, drainSkip, time.Time{}},
		{"retired already", connView{state: connRetired, http: http.StateIdle}, false, drainSkip, time.Time{}},
		{"read-drain over", connView{state: connDone, http: http.StateIdle}, false, drainSkip, time.Time{}},
		{"being passed on", connView{state: connHanding, http: http.StateIdle}, true, drainSkip, time.Time{}},
		{"passed on", connView{state: connHanded, http: http.StateIdle}, true, drainSkip, time.Time{}},
		{"claimed: wait for Close or a request", connView{state: connClaimed, http: http.StateIdle}, true, drainWait, time.Time{}},
		{"active before the drain: response may offer keep-alive", connView{http: http.StateActive, preDrain: true}, false, drainWait, time.Time{}},
		{"active since the drain: answered with Connection: close", connView{http: http.StateActive}, false, drainSkip, time.Time{}},
		{"active, plain, with successor: passed on when idle", connView{http: http.StateActive}, true, drainWait, time.Time{}},
		{"active, TLS, with successor: answered with Connection: close", connView{http: http.StateActive, tls: true}, true, drainSkip, time.Time{}},
		{"idle, request arriving since before the drain: bounded from the drain", connView{state: connSeen, http: http.StateIdle}, false, drainExpire, drainStart.Add(arrival)},
		{"idle, request arriving since the drain: bounded from its first byte", connView{state: connSeen, http: http.StateIdle, seenAt: after}, false, drainExpire, after.Add(arrival)},
		{"new, request arriving, no successor: net/http would drop it after Shutdown", connView{state: connSeen, http: http.StateNew}, false, drainExpire, drainStart.Add(arrival)},
		{"new, request arriving, successor", connView{state: connSeen, http: http.StateNew, seenAt: after}, true, drainExpire, after.Add(arrival)},
		{"idle plain, successor: claim", connView{http: http.StateIdle}, true, drainClaim, time.Time{}},
		{"idle TLS, successor: retire", connView{http: http.StateIdle, tls: true, since: before}, true, drainRetire, drainStart.Add(grace)},
		{"idle since before the drain: grace from the drain", connView{http: http.StateIdle, since: before}, false, drainRetire, drainStart.Add(grace)},
		{"idle since the drain: grace from going idle", connView{http: http.StateIdle, since: after}, false, drainRetire, after.Add(grace)},
		{"hijacked: waited for elsewhere", connView{http: http.StateHijacked}, false, drainSkip, time.Time{}},
	}
	for _, c := range cases {
		got, at := decideDrain(c.c, c.handoff, drainStart, grace, arrival)
		assert.Equal(t, c.want, got, c.name)
		assert.Equal(t, c.at, at, c.name)
	}
}

// A client pipelines its next request while the current one is served and
// the drain with a successor begins: net/http's background read holds the
// next request's first byte when the response goes out. That request is
// served here, whole; the connection is passed on only after, with nothing
// of it left behind. (Before the held flag, the successor got the socket
// without that byte and answered 400 to "ET /2 ...".)
func TestPipelinedRequestAtHandOff(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	tr := newTracker(ln.Addr().String())
	backgroundRead := make(chan struct{})
	tr.testAfterRead = func(b []byte) {
		if len(b) == 1 {
			select {
			case <-backgroundRead:
			default:
				close(backgroundRead)
			}
		}
	}
	passed := make(chan string, 1)
	active := make(chan struct{}, 1)
	srv := &http.Server{
		ConnState: func(c net.Conn, s http.ConnState) {
			tr.setHTTPState(c, s)
			if s == http.StateActive {
				select {
				case active <- struct{}{}:
				default:
				}
			}
		},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/1" {
				<-backgroundRead // the next request's first byte is in net/http
				tr.setSend(func(c net.Conn) error {
					// What the successor would read: whatever is left.
					c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
					b, _ := io.ReadAll(c)
					passed <- string(b)
					return nil
				})
			}
			fmt.Fprint(w, "served here: ", r.URL.Path)
		}),
	}
	go srv.Serve(&trackedListener{Listener: ln, t: tr})
	defer srv.Close()

	c, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	_, err = io.WriteString(c, "GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
	require.NoError(t, err)
	<-active // sent once request 1 is in its handler: net/http's background read, not its request reader, takes the first byte
	_, err = io.WriteString(c, "GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
	require.NoError(t, err)
	r := bufio.NewReader(c)
	for _, want := range []string{"served here: /1", "served here: /2"} {
		resp, err := http.ReadResponse(r, nil)
		require.NoError(t, err, want)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Equal(t, want, string(b))
	}
	assert.Equal(t, "", <-passed, "passed on after request 2, with nothing of it")
}
