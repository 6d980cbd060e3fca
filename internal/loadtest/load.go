package loadtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

// Mix is the shape of the load: how many workers of each kind.
type Mix struct {
	KeepAliveGET  int           // GET / on a reused connection
	KeepAlivePOST int           // POST /echo on a reused connection, body verified
	FreshGET      int           // GET / on a new connection each time
	Slow          int           // GET /slow, in flight across upgrades
	SlowFor       time.Duration // how long /slow sleeps (default 300 ms)
	SSE           int           // GET /sse streams
	WS            int           // /ws WebSocket echo streams
	Pause         time.Duration // pause between requests of one worker (default 2 ms)
	MaxPause      time.Duration // when above Pause, each pause is random in [Pause, MaxPause)
	// Proto is the protocol of the request workers: "" (HTTP/1.1), "h2c"
	// (HTTP/2 with prior knowledge) or "h2" (HTTP/2 over TLS, certificate
	// not verified). Responses in another protocol count as failures.
	Proto string
	// Dial, when set, makes every connection of the load (another network
	// namespace, say); nil means net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Load is running traffic against one address.
type Load struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	stats  Stats
}

// Stats counts what the clients saw.
type Stats struct {
	mu       sync.Mutex
	Requests int
	Failures map[string]int // by class: refused, reset, eof, timeout, status, body, other
	Samples  []string       // the first failure messages
	PIDs     map[string]int // responses per serving PID

	StreamsGraceful int            // ended with the server's goodbye (SSE reconnect, WS 1012/1001)
	StreamsAbrupt   int            // ended any other way
	StreamFailures  int            // streams that could not be opened
	StreamPIDs      map[string]int // streams opened per serving PID
	Goodbyes        []time.Time    // when each goodbye arrived
	Latencies       []Latency      // of every successful request
	Timeline        []Outcome      // every request, as it ended
}

// Outcome is one request as it ended, answered by PID or failed, or a
// stream that could not open or was cut (Stream).
type Outcome struct {
	At     time.Time
	PID    string // the answering process; "" if it failed
	Failed bool
	Stream bool
}

// Latency is one successful request: when it started and how long it took.
type Latency struct {
	At time.Time
	D  time.Duration
}

func (s *Stats) streamOpened(pid string) {
	s.mu.Lock()
	s.StreamPIDs[pid]++
	s.mu.Unlock()
}

// Failed returns the number of failed requests and streams cut abruptly.
func (s *Stats) Failed() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.StreamsAbrupt + s.StreamFailures
	for _, c := range s.Failures {
		n += c
	}
	return n
}

func (s *Stats) ok(pid string) {
	s.mu.Lock()
	s.Requests++
	s.PIDs[pid]++
	s.Timeline = append(s.Timeline, Outcome{At: time.Now(), PID: pid})
	s.mu.Unlock()
}

func (s *Stats) fail(class, msg string) {
	s.mu.Lock()
	s.Requests++
	s.Failures[class]++
	s.Timeline = append(s.Timeline, Outcome{At: time.Now(), Failed: true})
	if len(s.Samples) < 10 {
		s.Samples = append(s.Samples, class+": "+msg)
	}
	s.mu.Unlock()
}

func (s *Stats) streamEnd(graceful bool, why string) {
	s.mu.Lock()
	if graceful {
		s.StreamsGraceful++
		s.Goodbyes = append(s.Goodbyes, time.Now())
	} else {
		s.StreamsAbrupt++
		s.Timeline = append(s.Timeline, Outcome{At: time.Now(), Failed: true, Stream: true})
		if len(s.Samples) < 10 {
			s.Samples = append(s.Samples, "stream cut: "+why)
		}
	}
	s.mu.Unlock()
}

// Classify names the class of a client error. A reset while connecting
// counts as refused: the connection was still in the listen queue when the
// last listener closed, and no server ever accepted it.
func Classify(err error) string {
	var ne net.Error
	var op *net.OpError
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.As(err, &op) && op.Op == "dial" && errors.Is(err, syscall.ECONNRESET):
		return "refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "reset"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "connection refused"):
		return "refused"
	case strings.Contains(msg, "connection reset"), strings.Contains(msg, "broken pipe"):
		return "reset"
	case strings.Contains(msg, "EOF"), strings.Contains(msg, "server closed idle connection"):
		return "eof"
	}
	return "other"
}

// StartLoad starts the workers of mix against addr.
func StartLoad(addr string, mix Mix) *Load {
	if mix.SlowFor == 0 {
		mix.SlowFor = 300 * time.Millisecond
	}
	if mix.Pause == 0 {
		mix.Pause = 2 * time.Millisecond
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := &Load{cancel: cancel, stats: Stats{Failures: map[string]int{}, PIDs: map[string]int{}, StreamPIDs: map[string]int{}}}
	base := "http://" + addr
	if mix.Proto == "h2" {
		base = "https://" + addr
	}
	spawn := func(n int, f func(context.Context)) {
		for range n {
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				f(ctx)
			}()
		}
	}
	spawn(mix.KeepAliveGET, func(ctx context.Context) {
		l.requests(ctx, mix, false, func() *http.Request { return get(base + "/") }, "ok")
	})
	spawn(mix.FreshGET, func(ctx context.Context) {
		l.requests(ctx, mix, true, func() *http.Request { return get(base + "/") }, "ok")
	})
	slowURL := fmt.Sprintf("%s/slow?ms=%d", base, mix.SlowFor.Milliseconds())
	spawn(mix.Slow, func(ctx context.Context) {
		l.requests(ctx, mix, false, func() *http.Request { return get(slowURL) }, "ok")
	})
	spawn(mix.KeepAlivePOST, func(ctx context.Context) { l.posts(ctx, mix, base+"/echo") })
	spawn(mix.SSE, func(ctx context.Context) { l.sse(ctx, mix, base+"/sse") })
	spawn(mix.WS, func(ctx context.Context) { l.ws(ctx, mix, "ws://"+addr+"/ws") })
	return l
}

// Stop ends the load and returns what the clients saw.
func (l *Load) Stop() *Stats {
	l.cancel()
	l.wg.Wait()
	return &l.stats
}

// Snapshot returns the current counters (copy), while the load runs.
func (l *Load) Snapshot() (requests, failed int) {
	return l.stats.requests(), l.stats.Failed()
}

func (s *Stats) requests() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.Requests
}

func get(url string) *http.Request {
	r, _ := http.NewRequest(http.MethodGet, url, nil)
	return r
}

// NewTransport returns a client transport for proto ("", "h2c" or "h2", as
// in [Mix]); fresh disables keep-alive.
func NewTransport(proto string, fresh bool) *http.Transport {
	tr := &http.Transport{DisableKeepAlives: fresh, MaxIdleConnsPerHost: 1}
	switch proto {
	case "h2c":
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetUnencryptedHTTP2(true)
	case "h2":
		tr.TLSClientConfig = &tls.Config{InsecureSkipVerify: true}
		tr.ForceAttemptHTTP2 = true
	}
	return tr
}

func newClient(mix Mix, fresh bool) (*http.Client, *http.Transport) {
	tr := NewTransport(mix.Proto, fresh)
	if mix.Dial != nil {
		tr.DialContext = mix.Dial
	}
	return &http.Client{Transport: tr, Timeout: 15 * time.Second}, tr
}

func (l *Load) requests(ctx context.Context, mix Mix, fresh bool, mk func() *http.Request, want string) {
	c, tr := newClient(mix, fresh)
	defer tr.CloseIdleConnections()
	for ctx.Err() == nil {
		l.do(ctx, mix, c, mk(), []byte(want))
		pause(ctx, mix.pause())
	}
}

func (m Mix) pause() time.Duration {
	if m.MaxPause > m.Pause {
		return m.Pause + rand.N(m.MaxPause-m.Pause)
	}
	return m.Pause
}

func (l *Load) posts(ctx context.Context, mix Mix, url string) {
	c, tr := newClient(mix, false)
	defer tr.CloseIdleConnections()
	for ctx.Err() == nil {
		body := make([]byte, 64+rand.IntN(448))
		for i := range body {
			body[i] = 'a' + byte(rand.IntN(26))
		}
		r, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
		l.do(ctx, mix, c, r, body)
		pause(ctx, mix.pause())
	}
}

func (l *Load) do(ctx context.Context, mix Mix, c *http.Client, r *http.Request, want []byte) {
	start := time.Now()
	resp, err := c.Do(r.WithContext(ctx))
	if ctx.Err() != nil {
		if err == nil {
			resp.Body.Close()
		}
		return // the load is stopping; not the server's doing
	}
	if err != nil {
		l.stats.fail(Classify(err), err.Error())
		return
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	switch {
	case err != nil && ctx.Err() != nil:
	case err != nil:
		l.stats.fail(Classify(err), "reading body: "+err.Error())
	case (mix.Proto == "") != (resp.ProtoMajor == 1):
		l.stats.fail("proto", fmt.Sprintf("%s %s: answered in %s, want %q", r.Method, r.URL.Path, resp.Proto, mix.Proto))
	case resp.StatusCode != http.StatusOK:
		l.stats.fail("status", fmt.Sprintf("%s %s: %s", r.Method, r.URL.Path, resp.Status))
	case !bytes.Equal(got, want):
		l.stats.fail("body", fmt.Sprintf("%s %s: body of %d bytes differs from the %d expected", r.Method, r.URL.Path, len(got), len(want)))
	default:
		l.stats.ok(resp.Header.Get("X-Pid"))
		if r.URL.Path != "/slow" { // slow requests sleep on purpose
			l.stats.mu.Lock()
			l.stats.Latencies = append(l.stats.Latencies, Latency{At: start, D: time.Since(start)})
			l.stats.mu.Unlock()
		}
	}
}

func pause(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// sse holds an event stream open, reconnecting whenever it ends.
func (l *Load) sse(ctx context.Context, mix Mix, url string) {
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, DialContext: mix.Dial}}
	for ctx.Err() == nil {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := c.Do(req)
		if ctx.Err() != nil {
			if err == nil {
				resp.Body.Close()
			}
			return
		}
		if err != nil || resp.StatusCode != http.StatusOK {
			l.streamOpenFailed(err, resp)
			pause(ctx, 50*time.Millisecond)
			continue
		}
		l.stats.streamOpened(resp.Header.Get("X-Pid"))
		goodbye := false
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if sc.Text() == "event: reconnect" {
				goodbye = true
			}
		}
		err = sc.Err()
		resp.Body.Close()
		if ctx.Err() != nil {
			return
		}
		why := "stream ended without reconnect event"
		if err != nil {
			why = err.Error()
		}
		l.stats.streamEnd(goodbye && err == nil, why)
	}
}

func (l *Load) streamOpenFailed(err error, resp *http.Response) {
	msg := ""
	if err != nil {
		msg = err.Error()
	} else {
		msg = resp.Status
		resp.Body.Close()
	}
	l.stats.mu.Lock()
	l.stats.StreamFailures++
	l.stats.Timeline = append(l.stats.Timeline, Outcome{At: time.Now(), Failed: true, Stream: true})
	if len(l.stats.Samples) < 10 {
		l.stats.Samples = append(l.stats.Samples, "stream open: "+msg)
	}
	l.stats.mu.Unlock()
}

// ws keeps a WebSocket echo session going, reconnecting after each close.
func (l *Load) ws(ctx context.Context, mix Mix, url string) {
	d := websocket.Dialer{HandshakeTimeout: 10 * time.Second, NetDialContext: mix.Dial}
	for ctx.Err() == nil {
		conn, resp, err := d.DialContext(ctx, url, nil)
		if ctx.Err() != nil {
			if err == nil {
				conn.Close()
			}
			return
		}
		if err != nil {
			if resp == nil {
				resp = &http.Response{Status: "no response", Body: http.NoBody}
			}
			l.streamOpenFailed(err, resp)
			pause(ctx, 50*time.Millisecond)
			continue
		}
		l.stats.streamOpened(resp.Header.Get("X-Pid"))
		stop := context.AfterFunc(ctx, func() { conn.Close() })
		graceful, why := echoUntilClosed(ctx, conn)
		stop()
		conn.Close()
		if ctx.Err() != nil {
			return
		}
		l.stats.streamEnd(graceful, why)
	}
}

func echoUntilClosed(ctx context.Context, conn *websocket.Conn) (bool, string) {
	for i := 0; ctx.Err() == nil; i++ {
		msg := fmt.Appendf(nil, "message %d", i)
		if err := conn.WriteMessage(websocket.TextMessage, msg); err != nil {
			return false, "write: " + err.Error()
		}
		_, got, err := conn.ReadMessage()
		if err != nil {
			if websocket.IsCloseError(err, websocket.CloseServiceRestart, websocket.CloseGoingAway) {
				return true, ""
			}
			return false, "read: " + err.Error()
		}
		if !bytes.Equal(got, msg) {
			return false, fmt.Sprintf("echo mismatch: %q for %q", got, msg)
		}
		pause(ctx, 50*time.Millisecond)
	}
	return false, "stopped"
}

// Report writes a short summary of s.
func (s *Stats) Report(w io.Writer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	failed := 0
	for _, c := range s.Failures {
		failed += c
	}
	fmt.Fprintf(w, "requests: %d, failed: %d", s.Requests, failed)
	classes := make([]string, 0, len(s.Failures))
	for k := range s.Failures {
		classes = append(classes, k)
	}
	sort.Strings(classes)
	for _, k := range classes {
		fmt.Fprintf(w, " %s=%d", k, s.Failures[k])
	}
	fmt.Fprintln(w)
	pids := make([]string, 0, len(s.PIDs))
	for k := range s.PIDs {
		pids = append(pids, k)
	}
	sort.Strings(pids)
	fmt.Fprint(w, "served by PIDs:")
	for _, k := range pids {
		fmt.Fprintf(w, " %s (%d)", k, s.PIDs[k])
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "streams ended: %d gracefully, %d abruptly; %d could not open\n", s.StreamsGraceful, s.StreamsAbrupt, s.StreamFailures)
	for _, m := range s.Samples {
		fmt.Fprintln(w, "  sample failure:", m)
	}
}

// StreamsOn returns how many streams were opened on generation pid so far.
func (l *Load) StreamsOn(pid int) int {
	l.stats.mu.Lock()
	defer l.stats.mu.Unlock()
	return l.stats.StreamPIDs[strconv.Itoa(pid)]
}

// Goodbyes returns when each goodbye so far arrived.
func (l *Load) Goodbyes() []time.Time {
	l.stats.mu.Lock()
	defer l.stats.mu.Unlock()
	return append([]time.Time(nil), l.stats.Goodbyes...)
}
