// Package bench holds the benchmarks of graceful: serving overhead and
// tracking memory (in process), keep-alive through many upgrades, and the
// drain of 10,000 idle connections plus 1,000 WebSockets (against the
// reference server). Run them with
//
//	go test -run '^$' -bench . -benchtime 1x ./internal/bench
//
// (BenchmarkServe wants the default -benchtime). Figures are reported as
// custom metrics.
package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/internal/loadtest"
)

var (
	procOnce sync.Once
	proc     *graceful.Process
	procErr  error
)

// process returns the one Process of this test binary, running.
func process(b *testing.B) *graceful.Process {
	procOnce.Do(func() {
		proc, procErr = graceful.New(graceful.Options{UpgradeSignals: []os.Signal{}, DrainSignals: []os.Signal{}})
		if procErr != nil {
			return
		}
		go proc.Run(context.Background()) // lives as long as the benchmark binary
		<-proc.Ready()
	})
	if procErr != nil {
		b.Fatal(procErr)
	}
	return proc
}

var okHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })

// serve starts a server with okHandler: a plain http.Server, or one
// registered with graceful's Serve.
func serve(b *testing.B, tracked bool) string {
	srv := &http.Server{Handler: okHandler}
	if tracked {
		p := process(b)
		ln, err := p.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		p.Serve(srv, ln) // starts at once: Run is running
		return ln.Addr().String()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// BenchmarkServe compares keep-alive GETs through Serve with a plain
// http.Server in the same run: compare the two ns/op (the ratio is the
// overhead of tracking).
func BenchmarkServe(b *testing.B) {
	for _, tracked := range []bool{false, true} {
		name := "plain"
		if tracked {
			name = "graceful"
		}
		b.Run(name, func(b *testing.B) {
			url := "http://" + serve(b, tracked) + "/"
			tr := &http.Transport{MaxIdleConnsPerHost: 4 * runtime.GOMAXPROCS(0)}
			defer tr.CloseIdleConnections()
			c := &http.Client{Transport: tr}
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					resp, err := c.Get(url)
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
		})
	}
}

// BenchmarkServeRatio measures the same load against a plain server and a
// Serve'd one in alternating 250 ms windows (20 rounds), so that drift on
// a shared machine hits both alike, and reports graceful/plain requests/s.
func BenchmarkServeRatio(b *testing.B) {
	urls := [2]string{"http://" + serve(b, false) + "/", "http://" + serve(b, true) + "/"}
	for range b.N {
		plain, tracked := alternate(b, urls)
		b.ReportMetric(tracked/plain, "graceful/plain")
		b.ReportMetric(plain, "plain-req/s")
		b.ReportMetric(tracked, "graceful-req/s")
	}
}

// BenchmarkEventsOverhead compares the reference server with its events
// hook set (-metrics, the default: Options.OnEvent feeds gracefulprom) and
// unset (-metrics=false) under the same keep-alive load, in alternating
// windows as BenchmarkServeRatio does, and reports set/unset requests/s.
// Events cost nothing per request: the in-flight count of a drain's event
// is read from the connection states the trackers keep anyway.
func BenchmarkEventsOverhead(b *testing.B) {
	set := startReference(b, nil, false)
	unset := startReference(b, []string{"-metrics=false"}, false)
	urls := [2]string{"http://" + unset.Addr + "/", "http://" + set.Addr + "/"}
	for range b.N {
		without, with := alternate(b, urls)
		b.ReportMetric(with/without, "set/unset")
		b.ReportMetric(without, "unset-req/s")
		b.ReportMetric(with, "set-req/s")
	}
}

// alternate runs keep-alive GET workers against urls[0] and urls[1] in
// alternating 250 ms windows, 20 rounds each, and returns the requests per
// second of each.
func alternate(b *testing.B, urls [2]string) (float64, float64) {
	workers := 4 * runtime.GOMAXPROCS(0)
	tr := &http.Transport{MaxIdleConnsPerHost: workers}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	var spent [2]time.Duration
	window := func(j int) int64 {
		url := urls[j]
		start := time.Now()
		defer func() { spent[j] += time.Since(start) }()
		var n atomic.Int64
		stop := start.Add(250 * time.Millisecond)
		var wg sync.WaitGroup
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(stop) {
					resp, err := c.Get(url)
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					n.Add(1)
				}
			}()
		}
		wg.Wait()
		return n.Load()
	}
	var totals [2]int64
	for round := range 20 {
		for i := range urls {
			j := (i + round) % 2 // alternate which goes first
			totals[j] += window(j)
		}
	}
	return float64(totals[0]) / spent[0].Seconds(), float64(totals[1]) / spent[1].Seconds()
}

// BenchmarkTrackingMemory holds 4,000 idle keep-alive connections on a
// plain server and on a Serve'd one and reports the heap each costs per
// connection; the difference is graceful's tracking.
func BenchmarkTrackingMemory(b *testing.B) {
	const conns = 4000
	perConn := func(tracked bool) float64 {
		addr := serve(b, tracked)
		before := heap()
		cs := make([]net.Conn, 0, conns)
		defer func() {
			for _, c := range cs {
				c.Close()
			}
		}()
		for range conns {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			cs = append(cs, c)
			r := bufio.NewReader(c)
			io.WriteString(c, "GET / HTTP/1.1\r\nHost: b\r\n\r\n")
			resp, err := http.ReadResponse(r, nil)
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		return float64(heap()-before) / conns
	}
	for range b.N {
		plain := perConn(false)
		tracked := perConn(true)
		b.ReportMetric(plain, "plain-B/conn")
		b.ReportMetric(tracked, "graceful-B/conn")
		b.ReportMetric(tracked-plain, "tracking-B/conn")
	}
}

func heap() uint64 {
	var m runtime.MemStats
	for range 3 {
		runtime.GC()
	}
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// startReference builds and starts the reference server.
func startReference(b *testing.B, args []string, tls bool) *loadtest.Server {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := b.TempDir()
	bin, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/examples/httpserver", false)
	if err != nil {
		b.Fatal(err)
	}
	logs, err := os.Create(filepath.Join(dir, "server.log"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { logs.Close() })
	srv, err := loadtest.Start(ctx, loadtest.Config{Bin: bin, Dir: dir, Logs: logs, Args: args, TLS: tls})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(srv.Kill)
	return srv
}

// BenchmarkKeepAliveUpgrades is the long form of TestKeepAliveAcrossUpgrades:
// keep-alive POST and GET workers (Go's http.Transport, random pauses up to
// 30 ms) through 50 upgrades of the reference server, 100 requests or more
// on each generation, over HTTP/1.1 (with the hand-off of idle connections,
// and with the close-based drain), h2c and HTTP/2 over TLS. It reports the
// failed requests (the target is 0).
func BenchmarkKeepAliveUpgrades(b *testing.B) {
	const upgrades = 50
	for _, tc := range []struct{ name, proto, flag string }{
		{"http1", "", ""}, {"http1-no-handoff", "", "-no-handoff"}, {"h2c", "h2c", "-h2c"}, {"h2", "h2", "-tls-self-signed"},
	} {
		b.Run(tc.name, func(b *testing.B) {
			for range b.N {
				var args []string
				if tc.flag != "" {
					args = []string{tc.flag}
				}
				srv := startReference(b, args, tc.proto == "h2")
				load := loadtest.StartLoad(srv.Addr, loadtest.Mix{
					KeepAlivePOST: 8, KeepAliveGET: 4, Proto: tc.proto,
					Pause: time.Millisecond, MaxPause: 30 * time.Millisecond,
				})
				var exits time.Duration
				for i := range upgrades {
					// 100 requests on each generation first.
					before, _ := load.Snapshot()
					for n := before; n < before+100; n, _ = load.Snapshot() {
						time.Sleep(2 * time.Millisecond)
					}
					u, err := srv.Upgrade(context.Background(), 30*time.Second)
					if err != nil {
						load.Stop()
						b.Fatalf("upgrade %d: %v", i+1, err)
					}
					exits += u.OldExit
				}
				stats := load.Stop()
				var report strings.Builder
				stats.Report(&report)
				b.Log(report.String())
				b.ReportMetric(float64(stats.Requests), "requests")
				b.ReportMetric(float64(stats.Failed()), "failed")
				b.ReportMetric(float64(exits.Milliseconds())/upgrades, "ms-to-old-exit")
			}
		})
	}
}

// BenchmarkDrain10kIdle holds 10,000 idle keep-alive connections and 1,000
// WebSockets on the reference server, upgrades it, and reports how long the
// old process took to drain and exit, its memory, and the client errors.
// "close" (-no-handoff): an idle connection must end with a FIN (EOF),
// never a reset. "handoff": it must be handed over and answer its next
// request from the new process. Either way a WebSocket ends with close 1012.
func BenchmarkDrain10kIdle(b *testing.B) {
	const idle, sockets = 10000, 1000
	for _, mode := range []string{"close", "handoff"} {
		b.Run(mode, func(b *testing.B) {
			for range b.N {
				args := []string{"-drain-timeout", "30s", "-goodbye-spread", "2s"}
				if mode == "close" {
					args = append(args, "-no-handoff")
				}
				drain10k(b, startReference(b, args, false), idle, sockets, mode == "handoff")
			}
		})
	}
}

func drain10k(b *testing.B, srv *loadtest.Server, idle, sockets int, handoff bool) {
	var errs atomic.Int64
	var sample atomic.Value
	fail := func(err error) {
		errs.Add(1)
		sample.CompareAndSwap(nil, err.Error())
	}
	var wg sync.WaitGroup
	opened := make(chan struct{}, idle+sockets)
	upgraded := make(chan struct{}) // closed after the upgrade
	var newPID, handed atomic.Int64
	sem := make(chan struct{}, 200) // concurrent dials
	get := func(c net.Conn, r *bufio.Reader) (*http.Response, error) {
		if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: b\r\n\r\n"); err != nil {
			return nil, err
		}
		resp, err := http.ReadResponse(r, nil)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		return resp, err
	}
	for range idle {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			c, err := net.Dial("tcp", srv.Addr)
			var r *bufio.Reader
			if err == nil {
				r = bufio.NewReader(c)
				_, err = get(c, r)
			}
			<-sem
			if err != nil {
				fail(err)
				return
			}
			defer c.Close()
			opened <- struct{}{}
			c.SetReadDeadline(time.Now().Add(2 * time.Minute))
			if !handoff {
				if _, err := r.ReadByte(); !errors.Is(err, io.EOF) {
					fail(fmt.Errorf("idle connection: want EOF, got %v", err))
				}
				return
			}
			<-upgraded
			resp, err := get(c, r)
			switch {
			case err != nil:
				fail(fmt.Errorf("handed-off connection: %v", err))
			case resp.Header.Get("X-Pid") != strconv.FormatInt(newPID.Load(), 10):
				fail(fmt.Errorf("handed-off connection served by pid %s", resp.Header.Get("X-Pid")))
			default:
				handed.Add(1) // the same connection, answered by the new process
			}
		}()
	}
	for range sockets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			ws, _, err := websocket.DefaultDialer.Dial("ws://"+srv.Addr+"/ws", nil)
			<-sem
			if err != nil {
				fail(err)
				return
			}
			defer ws.Close()
			opened <- struct{}{}
			ws.SetReadDeadline(time.Now().Add(2 * time.Minute))
			if _, _, err := ws.ReadMessage(); !websocket.IsCloseError(err, websocket.CloseServiceRestart) {
				fail(fmt.Errorf("websocket: want close 1012, got %v", err))
			}
		}()
	}
	for range idle + sockets - int(errs.Load()) {
		select {
		case <-opened:
		case <-time.After(time.Minute):
			b.Fatalf("connections not open after a minute (%d errors, first: %v)", errs.Load(), sample.Load())
		}
	}
	old := srv.PID()
	steady := loadtest.ProcStatus(old, "VmRSS")
	peakRSS := loadtest.WatchPeakRSS(old)
	u, err := srv.Upgrade(context.Background(), time.Minute)
	peak := peakRSS()
	if err != nil {
		b.Fatal(err)
	}
	newPID.Store(int64(u.NewPID))
	close(upgraded)
	wg.Wait()
	b.ReportMetric(float64(u.OldExit.Milliseconds()), "ms-to-old-exit")
	b.ReportMetric(float64(steady)/1024, "old-steady-RSS-MiB")
	b.ReportMetric(float64(peak)/1024, "old-peak-RSS-MiB")
	b.ReportMetric(float64(errs.Load()), "client-errors")
	if handoff {
		b.ReportMetric(float64(handed.Load()), "handed")
	}
	if errs.Load() > 0 {
		b.Logf("first client error: %v", sample.Load())
	}
}

// BenchmarkStrictIdleClients compares the hand-off of idle connections with
// the close-based drain (-no-handoff), in the same run: 20 clients that
// never retry and never check their connection before reusing it, idle
// 1.2-3 s between requests (longer than the 1 s IdleGrace), through 8
// upgrades. It reports their failed requests, the connections handed over
// per upgrade, and how long the old process took to exit.
func BenchmarkStrictIdleClients(b *testing.B) {
	const clients, upgrades = 20, 8
	for _, mode := range []string{"handoff", "close"} {
		b.Run(mode, func(b *testing.B) {
			for range b.N {
				var args []string
				if mode == "close" {
					args = []string{"-no-handoff"}
				}
				srv := startReference(b, args, false)
				var requests, failed, handed atomic.Int64
				stop := make(chan struct{})
				var wg sync.WaitGroup
				for range clients {
					wg.Add(1)
					go func() {
						defer wg.Done()
						strictClient(srv.Addr, stop, &requests, &failed, &handed)
					}()
				}
				var exits time.Duration
				for i := range upgrades {
					time.Sleep(1500 * time.Millisecond) // let connections sit idle
					u, err := srv.Upgrade(context.Background(), time.Minute)
					if err != nil {
						b.Fatalf("upgrade %d: %v", i+1, err)
					}
					exits += u.OldExit
				}
				time.Sleep(3 * time.Second)
				close(stop)
				wg.Wait()
				b.ReportMetric(float64(requests.Load()), "requests")
				b.ReportMetric(float64(failed.Load()), "failed")
				b.ReportMetric(float64(exits.Milliseconds())/upgrades, "ms-to-old-exit")
				b.ReportMetric(float64(handed.Load())/upgrades, "handed/upgrade")
			}
		})
	}
}

// strictClient sends GET / on one connection, pausing 1.2-3 s between
// requests, never checking or retrying; after a failure it reconnects. A
// response on the same connection from another PID than the previous one
// counts as a hand-off.
func strictClient(addr string, stop <-chan struct{}, requests, failed, handed *atomic.Int64) {
	var c net.Conn
	var r *bufio.Reader
	var lastPID string // of the previous response on c
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	for {
		if c == nil {
			var err error
			if c, err = net.Dial("tcp", addr); err != nil {
				failed.Add(1)
				return
			}
			r = bufio.NewReader(c)
			lastPID = ""
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		_, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: b\r\n\r\n")
		var resp *http.Response
		if err == nil {
			resp, err = http.ReadResponse(r, nil)
		}
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		if err == nil {
			if pid := resp.Header.Get("X-Pid"); lastPID != "" && pid != lastPID {
				handed.Add(1)
			}
			lastPID = resp.Header.Get("X-Pid")
		}
		requests.Add(1)
		if err != nil || resp.Close {
			if err != nil {
				failed.Add(1)
			}
			c.Close()
			c = nil
		}
		select {
		case <-stop:
			return
		case <-time.After(1200*time.Millisecond + time.Duration(rand.Int64N(int64(1800*time.Millisecond)))):
		}
	}
}

// BenchmarkHandover compares SIGHUP → new process ready (PID file written,
// so accepting) with the bare start-up of the same binary (exec → PID file
// written), 10 of each, both seen through the same 2 ms PID-file polling.
// The ratio is what the upgrade adds on top of starting the program.
func BenchmarkHandover(b *testing.B) {
	const n = 10
	for range b.N {
		ctx := context.Background()
		dir := b.TempDir()
		bin, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/examples/httpserver", false)
		if err != nil {
			b.Fatal(err)
		}
		var bare time.Duration
		for i := range n {
			d := filepath.Join(dir, strconv.Itoa(i))
			os.Mkdir(d, 0o755)
			start := time.Now()
			srv, err := loadtest.Start(ctx, loadtest.Config{Bin: bin, Dir: d, Logs: io.Discard, NoHTTP: true})
			if err != nil {
				b.Fatal(err)
			}
			bare += time.Since(start)
			srv.Kill()
		}
		srv := startReference(b, nil, false)
		var handover time.Duration
		for i := range n {
			u, err := srv.Upgrade(ctx, time.Minute)
			if err != nil {
				b.Fatalf("upgrade %d: %v", i+1, err)
			}
			handover += u.Ready
		}
		b.ReportMetric(float64(bare.Microseconds())/n/1000, "bare-start-ms")
		b.ReportMetric(float64(handover.Microseconds())/n/1000, "handover-ms")
		b.ReportMetric(float64(handover)/float64(bare), "handover/bare")
	}
}

// BenchmarkHandOffThroughput measures how fast idle keep-alive connections
// are handed to the new process: n connections, each having made one
// request, sit idle; the server is upgraded; the moment the new process is
// ready (its PID file), every client sends its next request on its own
// connection. It reports the hand-off time per connection (new process
// ready → old process exit, which waits for the last hand-off, over n), the
// longest wait of any client's next request, how many were answered by the
// new process (a request that reaches the old one before its connection is
// claimed is answered there, then the connection is handed), and checks
// that none failed.
//
// In mode "quiet" the clients send their next request only once the old
// process has exited, so the hand-off runs alone and µs/conn is its own
// cost; in mode "busy" they send it the moment the new process is ready,
// and ms-longest-wait is what a client waits at worst meanwhile.
func BenchmarkHandOffThroughput(b *testing.B) {
	for _, n := range []int{1000, 19000} {
		for _, mode := range []string{"quiet", "busy"} {
			b.Run(fmt.Sprintf("%d/%s", n, mode), func(b *testing.B) {
				for range b.N {
					handOffThroughput(b, n, mode == "busy")
				}
			})
		}
	}
}

func handOffThroughput(b *testing.B, n int, busy bool) {
	srv := startReference(b, []string{"-drain-timeout", "60s"}, false)
	type client struct {
		c net.Conn
		r *bufio.Reader
	}
	clients := make([]client, n)
	for i := range clients {
		c, err := net.Dial("tcp", srv.Addr)
		if err != nil {
			b.Fatalf("dial %d: %v", i, err)
		}
		defer c.Close()
		clients[i] = client{c, bufio.NewReader(c)}
		if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: b\r\n\r\n"); err != nil {
			b.Fatal(err)
		}
	}
	for _, cl := range clients {
		resp, err := http.ReadResponse(cl.r, nil)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	old := srv.PID()
	start := time.Now()
	if err := srv.Signal(syscall.SIGHUP); err != nil {
		b.Fatal(err)
	}
	var newPID int
	for newPID == 0 || newPID == old {
		if time.Since(start) > time.Minute {
			b.Fatal("no new process")
		}
		time.Sleep(time.Millisecond)
		newPID = loadtest.ReadPIDFile(srv.PIDFile)
	}
	ready := time.Since(start)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var oldExit time.Duration
	if !busy {
		if _, err := srv.WaitExit(ctx, old); err != nil {
			b.Fatal(err)
		}
		oldExit = time.Since(start)
	}
	var wg sync.WaitGroup
	var longest atomic.Int64
	var failed, byNew atomic.Int64
	sent := time.Now()
	for _, cl := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl.c.SetDeadline(time.Now().Add(time.Minute))
			_, err := io.WriteString(cl.c, "GET / HTTP/1.1\r\nHost: b\r\n\r\n")
			var resp *http.Response
			if err == nil {
				resp, err = http.ReadResponse(cl.r, nil)
			}
			if err != nil {
				failed.Add(1)
				return
			}
			if resp.Header.Get("X-Pid") == strconv.Itoa(newPID) {
				byNew.Add(1)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			for d := int64(time.Since(sent)); ; {
				cur := longest.Load()
				if d <= cur || longest.CompareAndSwap(cur, d) {
					break
				}
			}
		}()
	}
	if busy {
		if _, err := srv.WaitExit(ctx, old); err != nil {
			b.Fatal(err)
		}
		oldExit = time.Since(start)
	}
	wg.Wait()
	srv.Follow()
	if failed.Load() > 0 {
		b.Errorf("%d of %d next requests failed", failed.Load(), n)
	}
	b.ReportMetric(float64(byNew.Load()), "answered-by-new")
	b.ReportMetric(float64((oldExit-ready).Microseconds())/float64(n), "µs/conn")
	b.ReportMetric(float64(time.Duration(longest.Load()).Milliseconds()), "ms-longest-wait")
	b.ReportMetric(float64(ready.Milliseconds()), "ms-to-ready")
	b.ReportMetric(float64(oldExit.Milliseconds()), "ms-to-old-exit")
}

// BenchmarkLeakGate upgrades the reference server 500 times under steady
// mixed load and records, for each generation once its predecessor has
// exited, the descriptors, threads, goroutines and resident memory of the
// serving process. It reports the least-squares slope of each per
// generation (the target is 0: what one generation holds, the next holds
// too), the processes left behind, and the failed requests.
// TestLeakGate (examples/httpserver) is its short form.
func BenchmarkLeakGate(b *testing.B) {
	const upgrades = 500
	for range b.N {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		srv := startReference(b, nil, false)
		load := loadtest.StartLoad(srv.Addr, loadtest.Mix{KeepAliveGET: 4, KeepAlivePOST: 2, FreshGET: 2, Slow: 2, SSE: 2, WS: 2})
		var fds, threads, goroutines, rss []float64
		pids := []int{srv.PID()}
		for i := range upgrades {
			u, err := srv.Upgrade(ctx, time.Minute)
			if err != nil {
				b.Fatalf("upgrade %d: %v", i, err)
			}
			srv.Follow()
			pids = append(pids, u.NewPID)
			r, err := loadtest.Measure(ctx, u.NewPID, srv.Addr)
			if err != nil {
				b.Fatal(err)
			}
			fds = append(fds, float64(r.FDs))
			threads = append(threads, float64(r.Threads))
			goroutines = append(goroutines, float64(r.Goroutines))
			rss = append(rss, float64(r.RSSKiB))
		}
		stats := load.Stop()
		left := 0
		for _, pid := range pids[:len(pids)-1] {
			if loadtest.Alive(pid) {
				left++
			}
		}
		cancel()
		b.ReportMetric(slope(fds), "fds/gen")
		b.ReportMetric(slope(goroutines), "goroutines/gen")
		b.ReportMetric(slope(threads), "threads/gen")
		b.ReportMetric(slope(rss), "KiB-RSS/gen")
		b.ReportMetric(float64(left), "processes-left")
		b.ReportMetric(float64(stats.Failed()), "failed")
		b.ReportMetric(float64(stats.Requests), "requests")
		b.Logf("first/last generation: %v/%v descriptors, %v/%v goroutines, %v/%v threads, %v/%v KiB",
			fds[0], fds[len(fds)-1], goroutines[0], goroutines[len(goroutines)-1], threads[0], threads[len(threads)-1], rss[0], rss[len(rss)-1])
	}
}

// slope is the least-squares slope of ys against their index.
func slope(ys []float64) float64 {
	n := float64(len(ys))
	var sx, sy, sxx, sxy float64
	for i, y := range ys {
		x := float64(i)
		sx += x
		sy += y
		sxx += x * x
		sxy += x * y
	}
	if d := n*sxx - sx*sx; d != 0 {
		return (n*sxy - sx*sy) / d
	}
	return 0
}
