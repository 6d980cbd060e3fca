// Command httpserver is the reference server: it shows how to embed graceful
// and is what the zero-downtime tests, the demo and the benchmarks drive.
//
// Contract (extend, never break):
//
//	flags  -addr host:port (default 127.0.0.1:8080), -pidfile path
//	GET  /          200 "ok", header X-Pid
//	POST /echo      200 echoing the body, header X-Pid
//	GET  /slow?ms=N sleeps N ms, then 200
//	GET  /sse       text/event-stream, "data: tick" every 100 ms; at drain
//	                "event: reconnect" then the stream ends
//	GET  /ws        WebSocket echo; at drain closes with 1012 (service restart)
//	GET  /readyz    200 while ready, 503 while draining
//	GET  /livez     200
//	GET  /metrics   Prometheus metrics: graceful_* (package gracefulprom),
//	                go_* and process_* (descriptors, threads, memory)
//	SIGHUP upgrades in place; SIGTERM drains and exits 0.
//
// Further flags: -drain-timeout, -upgrade-timeout, -drain-delay,
// -control path (a control socket for gracefulctl: "upgrade" answers with
// the outcome), -goodbye-spread (stream goodbyes spread over that long),
// -idle-grace, -no-handoff, -h2c (HTTP/2 without TLS too), -tls-self-signed
// (HTTPS with HTTP/2, certificate made at start), -metrics=false (no
// events hook and no /metrics: the server as without them), -probation
// DURATION and -canary-share FRACTION (each new version serves that share
// of the connections for that long and is promoted or rolled back on what
// it served; a rolled-back one exits 1), -probation-latency-ratio R (also
// roll back a new version whose p99 is more than R times the old one's),
// -stream-handoff (at an upgrade each /sse and /ws stream is handed to the
// new process, connection and all, instead of told goodbye; SSE events
// then carry "id: N"), -ticket-keys=false (each process makes its own TLS
// session ticket keys:
// no client resumes its session across an upgrade), -state-size BYTES (hand
// that much state, a checked pattern, to each new process: the state
// hand-over's benchmark).
//
// Build-time variables (go build -ldflags "-X main.version=v2 -X
// main.failRate=0.3 -X main.panicAfter=2s -X main.extraLatency=50ms"), so
// that anyone can produce a bad build without editing code; empty means
// none of it:
//
//	version       names the build in the control socket's status and is
//	              sent as an X-Version header
//	failRate      the fraction (0 to 1) of GET / and POST /echo answered 500
//	panicAfter    the process panics this long after it starts serving
//	              (on probation too)
//	extraLatency  added to every request
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/gracefulprom"
	"github.com/graceful-go/graceful/internal/selfsigned"
)

// Set at build time (see the package doc).
var version, failRate, panicAfter, extraLatency string

// faults is what the build-time variables ask this build to do wrong.
type faults struct {
	failRate     float64
	panicAfter   time.Duration
	extraLatency time.Duration
}

// parseFaults reads the build-time variables; an error names the one that
// does not parse.
func parseFaults() (faults, error) {
	var f faults
	var err error
	if failRate != "" {
		if f.failRate, err = strconv.ParseFloat(failRate, 64); err != nil || f.failRate < 0 || f.failRate > 1 {
			return f, fmt.Errorf("build variable main.failRate=%q: want a fraction from 0 to 1", failRate)
		}
	}
	for _, v := range []struct {
		name, s string
		d       *time.Duration
	}{{"panicAfter", panicAfter, &f.panicAfter}, {"extraLatency", extraLatency, &f.extraLatency}} {
		if v.s == "" {
			continue
		}
		if *v.d, err = time.ParseDuration(v.s); err != nil || *v.d < 0 {
			return f, fmt.Errorf("build variable main.%s=%q: want a duration such as 2s", v.name, v.s)
		}
	}
	return f, nil
}

// config is what the command line sets.
type config struct {
	addr, pidfile, control string
	drain, upgrade, delay  time.Duration
	spread, idleGrace      time.Duration
	h2c, selfSigned        bool
	noHandOff              bool
	metrics                bool
	probation              time.Duration
	canaryShare, p99Ratio  float64
	ticketKeys             bool
	stateSize              int
	streamHandOff          bool
}

// defineFlags defines the reference server's flags on fs.
func defineFlags(fs *flag.FlagSet) *config {
	c := &config{}
	fs.StringVar(&c.addr, "addr", "127.0.0.1:8080", "TCP address to serve on")
	fs.StringVar(&c.pidfile, "pidfile", "", "write the PID of the serving process here")
	fs.DurationVar(&c.drain, "drain-timeout", graceful.DefaultDrainTimeout, "hard deadline of a drain")
	fs.DurationVar(&c.upgrade, "upgrade-timeout", graceful.DefaultUpgradeTimeout, "how long a new process may take to become ready")
	fs.DurationVar(&c.delay, "drain-delay", 0, "on SIGTERM, fail readiness and keep serving this long before draining")
	fs.StringVar(&c.control, "control", "", "serve a control socket at this path (gracefulctl -socket PATH upgrade)")
	fs.DurationVar(&c.spread, "goodbye-spread", 0, "spread the goodbyes of SSE and WebSocket streams over this much of the drain")
	fs.DurationVar(&c.idleGrace, "idle-grace", graceful.DefaultIdleGrace, "how long an idle keep-alive connection may carry one more request once the drain starts")
	fs.BoolVar(&c.h2c, "h2c", false, "also serve HTTP/2 without TLS (prior knowledge)")
	fs.BoolVar(&c.noHandOff, "no-handoff", false, "at upgrades, close idle connections instead of handing them to the new process")
	fs.BoolVar(&c.selfSigned, "tls-self-signed", false, "serve HTTPS (HTTP/2 and HTTP/1.1) with a fresh self-signed certificate, for tests and benchmarks")
	fs.DurationVar(&c.probation, "probation", 0, "put each new version on probation this long, serving -canary-share of the connections, before it takes over (0: none)")
	fs.Float64Var(&c.canaryShare, "canary-share", 0, "the fraction of connections a new version on probation serves (0: graceful.DefaultCanaryShare)")
	fs.Float64Var(&c.p99Ratio, "probation-latency-ratio", 0, "also roll a new version back when its p99 latency exceeds the old one's this many times (0: off)")
	fs.BoolVar(&c.streamHandOff, "stream-handoff", false, "hand /sse and /ws streams to the new process at upgrades instead of saying goodbye (events then carry an id)")
	fs.IntVar(&c.stateSize, "state-size", 0, "hand this many bytes of state (a checked pattern) to each new process, to measure the state hand-over (0: none)")
	fs.BoolVar(&c.ticketKeys, "ticket-keys", true, "with -tls-self-signed, pass the TLS session ticket keys to each new process, so that clients resume their sessions across upgrades")
	fs.BoolVar(&c.metrics, "metrics", true, "export Prometheus metrics at GET /metrics (the events hook is set)")
	return c
}

func main() {
	c := defineFlags(flag.CommandLine)
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [flags]\n\nReference server for graceful: SIGHUP upgrades in place, SIGTERM drains.\n\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	opts := graceful.Options{
		Logger:         log,
		PIDFile:        c.pidfile,
		DrainTimeout:   c.drain,
		UpgradeTimeout: c.upgrade,
		DrainDelay:     c.delay,
		ControlSocket:  c.control,
		GoodbyeSpread:  c.spread,
		IdleGrace:      c.idleGrace,
		NoHandOff:      c.noHandOff,
		Version:        version,

		Probation:             c.probation,
		CanaryShare:           c.canaryShare,
		ProbationLatencyRatio: c.p99Ratio,
	}
	if !c.ticketKeys {
		opts.TicketKeyRotation = -1 // each process makes its own keys
	}
	if err := run(opts, c); err != nil {
		log.Error("exiting", "err", err)
		os.Exit(1)
	}
}

func run(opts graceful.Options, c *config) error {
	bad, err := parseFaults()
	if err != nil {
		return err
	}
	var metrics http.Handler
	if c.metrics {
		m := gracefulprom.New()
		opts.OnEvent = m.Observe
		reg := prometheus.NewRegistry()
		reg.MustRegister(m, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		metrics = promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	}
	p, err := graceful.New(opts)
	if err != nil {
		return err
	}
	if bad.panicAfter > 0 {
		go func() {
			<-p.Ready()
			time.Sleep(bad.panicAfter)
			panic(fmt.Sprintf("panicking %v after serving, as built (main.panicAfter)", bad.panicAfter))
		}()
	}
	if c.stateSize > 0 {
		if err := handState(p, c.stateSize); err != nil {
			return err
		}
	}
	ln, err := p.Listen("tcp", c.addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: routes(p, metrics, bad, c.streamHandOff), ReadHeaderTimeout: 10 * time.Second}
	if c.h2c {
		srv.Protocols = new(http.Protocols)
		srv.Protocols.SetHTTP1(true)
		srv.Protocols.SetUnencryptedHTTP2(true)
	}
	if c.selfSigned {
		cert, err := selfsigned.Certificate()
		if err != nil {
			return err
		}
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	p.Serve(srv, ln)
	return p.Run(context.Background())
}

// handState takes the state blob of size bytes from the previous process,
// checking it, or makes it, and offers it to the next one.
func handState(p *graceful.Process, size int) error {
	blob, _, err := p.State("blob", 1)
	switch {
	case errors.Is(err, graceful.ErrNoState):
		blob = make([]byte, size)
		for i := range blob {
			blob[i] = byte(i*31 + 7)
		}
	case err != nil:
		return err
	default:
		for i, b := range blob {
			if b != byte(i*31+7) {
				return fmt.Errorf("state blob corrupted at byte %d of %d", i, len(blob))
			}
		}
	}
	return p.OfferState("blob", 1, func() ([]byte, error) { return blob, nil })
}

// routes serves the contract; metrics, if not nil, at /metrics; bad makes
// a bad build.
func routes(p *graceful.Process, metrics http.Handler, bad faults, streamHandOff bool) http.Handler {
	pid := strconv.Itoa(os.Getpid())
	mux := http.NewServeMux()
	// fail answers 500 to the share of requests a bad build fails.
	fail := func(w http.ResponseWriter) bool {
		if bad.failRate > 0 && rand.Float64() < bad.failRate {
			w.Header().Set("X-Pid", pid)
			http.Error(w, "failing as built (main.failRate)", http.StatusInternalServerError)
			return true
		}
		return false
	}
	if metrics != nil {
		mux.Handle("GET /metrics", metrics)
	}
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		if fail(w) {
			return
		}
		w.Header().Set("X-Pid", pid)
		io.WriteString(w, "ok")
	})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		if fail(w) {
			return
		}
		// Read it all first: net/http's HTTP/1 server stops reading the
		// body once the response starts (past 512 bytes).
		b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 16<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("X-Pid", pid)
		w.Write(b)
	})
	mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 || ms > 600_000 {
			http.Error(w, "ms must be a whole number from 0 to 600000", http.StatusBadRequest)
			return
		}
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		w.Header().Set("X-Pid", pid)
		io.WriteString(w, "ok")
	})
	if streamHandOff {
		handOffStreams(p, mux)
	} else {
		mux.HandleFunc("GET /sse", sse)
		mux.HandleFunc("GET /ws", echoWS)
	}
	mux.Handle("GET /readyz", p.Health().Readiness())
	mux.Handle("GET /livez", p.Health().Liveness())
	if version == "" && bad.extraLatency == 0 {
		return mux
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if version != "" {
			w.Header().Set("X-Version", version)
		}
		if bad.extraLatency > 0 {
			select {
			case <-time.After(bad.extraLatency):
			case <-r.Context().Done():
				return
			}
		}
		mux.ServeHTTP(w, r)
	})
}

// sse ticks every 100 ms until its goodbye (the drain, spread by
// -goodbye-spread), then asks the client to reconnect (it will reach the new
// process) and ends the stream.
func sse(w http.ResponseWriter, r *http.Request) {
	fl, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	goodbye := graceful.FromContext(r.Context()).Goodbye(r.Context())
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Pid", strconv.Itoa(os.Getpid()))
	fl.Flush()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			if _, err := io.WriteString(w, "data: tick\n\n"); err != nil {
				return
			}
			fl.Flush()
		case <-goodbye:
			io.WriteString(w, "event: reconnect\ndata: server restarting\n\n")
			fl.Flush()
			return
		case <-r.Context().Done():
			return
		}
	}
}

var upgrader = websocket.Upgrader{}

// echoWS echoes messages until its goodbye, then closes with 1012
// (service restart) and waits briefly for the client's close reply.
func echoWS(w http.ResponseWriter, r *http.Request) {
	h := http.Header{"X-Pid": {strconv.Itoa(os.Getpid())}}
	c, err := upgrader.Upgrade(w, r, h)
	if err != nil {
		return
	}
	defer c.Close()
	goodbye := graceful.FromContext(r.Context()).Goodbye(r.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			typ, msg, err := c.ReadMessage()
			if err != nil {
				return
			}
			if err := c.WriteMessage(typ, msg); err != nil {
				return
			}
		}
	}()
	select {
	case <-done:
	case <-goodbye:
		msg := websocket.FormatCloseMessage(websocket.CloseServiceRestart, "server restarting")
		c.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
		select {
		case <-done: // the client answered the close
		case <-time.After(2 * time.Second):
		}
	}
}
