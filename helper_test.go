package graceful_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/control"
	"github.com/graceful-go/graceful/internal/loadtest"
	"github.com/graceful-go/graceful/internal/selfsigned"
)

// The test binary doubles as the server under test: with
// GRACEFUL_TEST_HELPER set it runs helperMain instead of the tests. Each
// upgrade re-executes the file at the helper's path, so a test deploys a
// bad "new version" by rewriting the mode file, replacing or removing the
// binary.
func TestMain(m *testing.M) {
	if os.Getenv("GRACEFUL_TEST_HELPER") != "" {
		os.Exit(helperMain())
	}
	if os.Getenv("GRACEFUL_TEST_CONTROL_CLIENT") != "" {
		os.Exit(controlClientMain())
	}
	os.Exit(m.Run())
}

// controlClientMain runs in a subprocess started by a test (as another
// user): it sends one control command and prints the outcome.
func controlClientMain() int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	msg, err := control.Upgrade(ctx, os.Getenv("GRACEFUL_TEST_CONTROL_CLIENT"))
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println("ok:", msg)
	return 0
}

// Modes of a helper generation, read from GRACEFUL_TEST_MODE_FILE at start.
const (
	modeOK        = "ok"        // a good server
	modeExit      = "exit"      // exits with status 3 during start-up
	modeHang      = "hang"      // hangs before creating the Process
	modeCheckFail = "checkfail" // its pre-ready check never passes
	modeSlowReady = "slowready" // its pre-ready check passes after 1.5 s
	modePanic     = "panic"     // panics 200 ms after declaring itself ready
	modeStateV2   = "statev2"   // with -state: offers, and reads only, version 2 of its state
	modeStateOver = "stateover" // with -state-pad N: offers N+1 bytes instead of N
)

func helperMain() int {
	mode := modeOK
	if f := os.Getenv("GRACEFUL_TEST_MODE_FILE"); f != "" {
		if b, err := os.ReadFile(f); err == nil {
			mode = strings.TrimSpace(string(b))
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("mode", mode)
	ev, err := openEvents(os.Getenv("GRACEFUL_TEST_EVENTS"))
	if err != nil {
		log.Error("events", "err", err)
		return 1
	}
	ev.add(evStarted)
	switch mode {
	case modeExit:
		log.Error("exiting during start-up, as told")
		return 3
	case modeHang:
		log.Info("hanging during start-up, as told")
		time.Sleep(time.Hour)
		return 4
	}
	fs := flag.NewFlagSet("helper", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:0", "")
	pidfile := fs.String("pidfile", "", "")
	unixPath := fs.String("unix", "", "also serve HTTP on this Unix socket")
	udpAddr := fs.String("udp", "", "also echo UDP datagrams on this address")
	upgradeTimeout := fs.Duration("upgrade-timeout", 3*time.Second, "")
	drainTimeout := fs.Duration("drain-timeout", 5*time.Second, "")
	drainDelay := fs.Duration("drain-delay", 0, "")
	idleGrace := fs.Duration("idle-grace", 0, "")
	noHandOff := fs.Bool("no-handoff", false, "")
	nofile := fs.Uint64("nofile", 0, "lower RLIMIT_NOFILE to this at start")
	control := fs.String("control", "", "")
	h2c := fs.Bool("h2c", false, "also serve HTTP/2 without TLS (prior knowledge)")
	useTLS := fs.Bool("tls", false, "serve HTTPS (HTTP/2 and HTTP/1.1) with a self-signed certificate")
	eventsHook := fs.Bool("events-hook", false, "record every Options.OnEvent event (see hookEvent)")
	withState := fs.Bool("state", false, "offer a state \"history\" (the PIDs of the generations so far) to the next generation; GET /state shows what this one received")
	statePad := fs.Int("state-pad", 0, "offer a state \"pad\" of this many bytes (see modeStateOver); GET /state-pad shows what this one received")
	maxState := fs.Int64("max-state", 0, "Options.MaxStateSize")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	if *nofile > 0 {
		if err := setNofile(*nofile); err != nil {
			log.Error("setrlimit", "err", err)
			return 1
		}
	}
	opts := graceful.Options{Logger: log, PIDFile: *pidfile, UpgradeTimeout: *upgradeTimeout, DrainTimeout: *drainTimeout, DrainDelay: *drainDelay, IdleGrace: *idleGrace, NoHandOff: *noHandOff, ControlSocket: *control, MaxStateSize: *maxState}
	if mode == modeCheckFail {
		opts.UpgradeTimeout = time.Hour // the parent's timeout must be what ends it
	}
	if *eventsHook {
		opts.OnEvent = func(e graceful.Event) { ev.add(hookEvent(e)) }
	}
	p, err := graceful.New(opts)
	if err != nil {
		log.Error("new", "err", err)
		return 1
	}
	switch mode {
	case modeCheckFail:
		p.Health().AddCheck("database", func(context.Context) error {
			ev.add(evChecking)
			return errors.New("database unreachable")
		})
	case modeSlowReady:
		start := time.Now()
		p.Health().AddCheck("warm-up", func(context.Context) error {
			ev.add(evChecking)
			if time.Since(start) < 1500*time.Millisecond {
				return errors.New("still warming up")
			}
			return nil
		})
	}
	ln, err := p.Listen("tcp", *addr)
	if err != nil {
		log.Error("listen", "err", err)
		return 1
	}
	mux := helperMux(p, ev)
	if *withState {
		version := 1
		if mode == modeStateV2 {
			version = 2
		}
		received, v, err := p.State("history", version)
		history := string(received) + strconv.Itoa(os.Getpid()) + "\n"
		p.OfferState("history", version, func() ([]byte, error) { return []byte(history), nil })
		mux.HandleFunc("GET /state", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "version %d, err %v\n%s", v, err, received)
		})
	}
	if *statePad > 0 {
		received, _, err := p.State("pad")
		n := *statePad
		if mode == modeStateOver {
			n++
		}
		pad := bytes.Repeat([]byte("p"), n)
		p.OfferState("pad", 1, func() ([]byte, error) { return pad, nil })
		mux.HandleFunc("GET /state-pad", func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%d bytes, err %v", len(received), err)
		})
	}
	srv := &http.Server{Handler: mux}
	if *h2c {
		srv.Protocols = new(http.Protocols)
		srv.Protocols.SetHTTP1(true)
		srv.Protocols.SetUnencryptedHTTP2(true)
	}
	if *useTLS {
		cert, err := selfsigned.Certificate()
		if err != nil {
			log.Error("certificate", "err", err)
			return 1
		}
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	p.Serve(srv, ln)
	if *unixPath != "" {
		uln, err := p.Listen("unix", *unixPath)
		if err != nil {
			log.Error("listen", "err", err)
			return 1
		}
		p.Serve(&http.Server{Handler: mux}, uln)
	}
	if *udpAddr != "" {
		pc, err := p.ListenPacket("udp", *udpAddr)
		if err != nil {
			log.Error("listen", "err", err)
			return 1
		}
		p.Add(func() error { return udpEcho(p, pc) }, func(context.Context) error { return pc.Close() })
	}
	if mode == modePanic {
		go func() {
			<-p.Ready()
			time.Sleep(200 * time.Millisecond)
			ev.add(evPanicking)
			panic("new version panics after ready, as told")
		}()
	}
	done := make(chan struct{})
	var watchers sync.WaitGroup
	watchers.Go(func() { ev.when(p.Ready(), done, evReady) })
	watchers.Go(func() { ev.when(p.Draining(), done, evDraining) })
	err = p.Run(context.Background())
	close(done)
	watchers.Wait()
	if err != nil {
		log.Error("run", "err", err)
		return 1
	}
	return 0
}

// Events a helper generation appends to the file GRACEFUL_TEST_EVENTS
// names, one line "<pid> <event>" each: what it witnessed through the public
// API. Tests wait on these and on other state, never on log wording.
const (
	evStarted      = "started"       // helperMain began: a generation was executed
	evReady        = "ready"         // Process.Ready closed
	evDraining     = "draining"      // Process.Draining closed
	evSlowStarted  = "slow-started"  // a /slow handler began
	evPanicWaiting = "panic-waiting" // a /panic handler waits for the drain
	evPanicking    = "panicking"     // a panic "as told" comes next
	evChecking     = "checking"      // a pre-ready check ran (modes checkfail, slowready)
)

// hookEvent is how a helper records an Options.OnEvent event: "hook
// <kind> key=value ...", keys in a fixed order.
func hookEvent(e graceful.Event) string {
	d, t := e.Drain, e.Totals
	return fmt.Sprintf("hook %s pid=%d gen=%d new=%d err=%t in-flight=%d handed=%d not-handed=%d retired=%d expired=%d forced=%d goodbyes=%d succeeded=%d failed=%d drains=%d",
		e.Kind, e.PID, e.Generation, e.NewPID, e.Err != nil, d.InFlight, d.Handed, d.NotHanded, d.Retired, d.Expired, d.Forced, d.Goodbyes, t.Succeeded, t.Failed, t.Drains)
}

// eventLog appends events; a nil *eventLog drops them.
type eventLog struct {
	f   *os.File
	pid string
}

func openEvents(path string) (*eventLog, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	return &eventLog{f: f, pid: strconv.Itoa(os.Getpid())}, nil
}

// add appends one event in a single write: with O_APPEND, lines from
// several goroutines and generations never interleave.
func (e *eventLog) add(event string) {
	if e != nil {
		e.f.Write([]byte(e.pid + " " + event + "\n"))
	}
}

// when adds event once c is closed. It returns at done (Run returned), after
// a last look at c: state changes are over by then.
func (e *eventLog) when(c <-chan struct{}, done <-chan struct{}, event string) {
	select {
	case <-c:
	case <-done:
		select {
		case <-c:
		default:
			return
		}
	}
	e.add(event)
}

func helperMux(p *graceful.Process, ev *eventLog) *http.ServeMux {
	pid := strconv.Itoa(os.Getpid())
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pid", pid)
		io.WriteString(w, "ok")
	})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pid", pid)
		// Read it all first: net/http's HTTP/1 server stops the body once
		// the response starts (past 512 bytes).
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Write(b)
	})
	// /slow?ms=N records that it started, then answers after N ms.
	mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		ev.add(evSlowStarted)
		time.Sleep(time.Duration(ms) * time.Millisecond)
		w.Header().Set("X-Pid", pid)
		io.WriteString(w, "ok")
	})
	// /stream sends its headers at once, then waits for its goodbye and
	// ends with "bye".
	mux.HandleFunc("GET /stream", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pid", pid)
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		select {
		case <-p.Goodbye(r.Context()):
			io.WriteString(w, "bye")
		case <-r.Context().Done():
		}
	})
	// /panic panics once the process drains, in the middle of a request.
	mux.HandleFunc("GET /panic", func(w http.ResponseWriter, r *http.Request) {
		ev.add(evPanicWaiting)
		<-p.Draining()
		ev.add(evPanicking)
		panic("handler panics during the drain, as told")
	})
	// /fds lists the descriptors a handler's subprocess holds.
	mux.HandleFunc("GET /fds", func(w http.ResponseWriter, r *http.Request) {
		out, err := exec.CommandContext(r.Context(), "sh", "-c", "ls -l /proc/$$/fd").CombinedOutput()
		if err != nil {
			http.Error(w, err.Error()+"\n"+string(out), http.StatusInternalServerError)
			return
		}
		w.Write(out)
	})
	// /env runs a real subprocess and returns the environment it got.
	mux.HandleFunc("GET /env", func(w http.ResponseWriter, r *http.Request) {
		out, err := exec.CommandContext(r.Context(), "env").Output()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Write(out)
	})
	mux.Handle("GET /readyz", p.Health().Readiness())
	// /phase answers the process's lifecycle phase.
	mux.HandleFunc("GET /phase", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pid", pid)
		io.WriteString(w, p.Phase().String())
	})
	// /upgrade calls Process.Upgrade and answers its error, naming in
	// X-Refused the sentinel it matches.
	mux.HandleFunc("POST /upgrade", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pid", pid)
		if err := p.Upgrade(r.Context()); err != nil {
			w.Header().Set("X-Refused", refusal(err))
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		io.WriteString(w, "upgraded")
	})
	// /hijack takes the connection and ignores the drain: only the drain
	// deadline can end it.
	mux.HandleFunc("GET /hijack", func(w http.ResponseWriter, r *http.Request) {
		c, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		buf.WriteString("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhijacked\n")
		buf.Flush()
		io.Copy(io.Discard, c) // returns when the drain deadline closes c
	})
	return mux
}

// Refusals of Process.Upgrade, as /upgrade names them in X-Refused.
const (
	refusedInProgress = "in-progress"
	refusedDraining   = "draining"
	refusedNotReady   = "not-ready"
)

func refusal(err error) string {
	switch {
	case errors.Is(err, graceful.ErrUpgradeInProgress):
		return refusedInProgress
	case errors.Is(err, graceful.ErrDraining):
		return refusedDraining
	case errors.Is(err, graceful.ErrNotReady):
		return refusedNotReady
	}
	return ""
}

func udpEcho(p *graceful.Process, pc net.PacketConn) error {
	buf := make([]byte, 1500)
	pid := strconv.Itoa(os.Getpid())
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			select {
			case <-p.Draining():
				return nil
			default:
				return err
			}
		}
		pc.WriteTo(append([]byte(pid+" "), buf[:n]...), from)
	}
}

// raceEnv makes a data race in a server fail its exit code, and spares the
// race detector's 1 s sleep at exit.
const raceEnv = "GORACE=halt_on_error=1 atexit_sleep_ms=0"

// helper is one helper server and its deployment directory.
type helper struct {
	*loadtest.Server
	t          *testing.T
	dir        string
	bin        string
	modeFile   string
	eventsFile string
	logs       *syncBuffer
}

// startHelper deploys a copy of the test binary and starts it.
func startHelper(t *testing.T, args []string, cfg loadtest.Config) *helper {
	t.Helper()
	dir := t.TempDir()
	h := &helper{t: t, dir: dir, bin: filepath.Join(dir, "server"), modeFile: filepath.Join(dir, "mode"), eventsFile: filepath.Join(dir, "events"), logs: &syncBuffer{}}
	h.deploy()
	h.setMode(modeOK)
	cfg.Bin, cfg.Dir, cfg.Logs, cfg.Args = h.bin, dir, h.logs, args
	cfg.Env = append(cfg.Env, raceEnv, "GRACEFUL_TEST_HELPER=1", "GRACEFUL_TEST_MODE_FILE="+h.modeFile, "GRACEFUL_TEST_EVENTS="+h.eventsFile)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv, err := loadtest.Start(ctx, cfg)
	if err != nil {
		t.Logf("server logs:\n%s", h.logs.String())
		t.Fatal(err)
	}
	h.Server = srv
	t.Cleanup(func() {
		srv.Kill()
		events, _ := os.ReadFile(h.eventsFile)
		// Generations the test did not follow (it failed midway, say) are
		// killed too: every one recorded its start.
		for line := range strings.Lines(string(events)) {
			pid, event, _ := strings.Cut(strings.TrimSpace(line), " ")
			if n, err := strconv.Atoi(pid); err == nil && event == evStarted && loadtest.Alive(n) {
				if proc, err := os.FindProcess(n); err == nil {
					proc.Kill()
				}
			}
		}
		if t.Failed() {
			t.Logf("server logs:\n%s\nhelper events:\n%s", h.logs.String(), events)
		}
	})
	return h
}

// deploy (re)installs the test binary as the server's executable.
func (h *helper) deploy() {
	h.t.Helper()
	self, err := os.Executable()
	require.NoError(h.t, err)
	src, err := os.Open(self)
	require.NoError(h.t, err)
	defer src.Close()
	require.NoError(h.t, loadtest.WriteExecutable(h.bin, src))
}

func (h *helper) setMode(mode string) {
	h.t.Helper()
	require.NoError(h.t, os.WriteFile(h.modeFile, []byte(mode), 0o644))
}

// upgradeAnswer is what the helper's POST /upgrade answered.
type upgradeAnswer struct {
	pid     int    // the process that answered
	err     string // the text of Upgrade's error; "" when it succeeded
	refused string // the sentinel error it matched (refusedInProgress...), or ""
}

// postUpgrade asks the process that accepts on addr to call
// Process.Upgrade, and returns what it answered. It is safe to call from any
// goroutine.
func postUpgrade(addr string) (upgradeAnswer, error) {
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Post("http://"+addr+"/upgrade", "", nil)
	if err != nil {
		return upgradeAnswer{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return upgradeAnswer{}, err
	}
	a := upgradeAnswer{refused: resp.Header.Get("X-Refused")}
	if a.pid, err = strconv.Atoi(resp.Header.Get("X-Pid")); err != nil {
		return a, fmt.Errorf("X-Pid: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		a.err = strings.TrimSpace(string(b))
	}
	return a, nil
}

// upgradeViaAPI asks the serving process to call Process.Upgrade and
// returns what it answered.
func (h *helper) upgradeViaAPI() upgradeAnswer {
	h.t.Helper()
	a, err := postUpgrade(h.Addr)
	require.NoError(h.t, err)
	return a
}

// phase returns the lifecycle phase of the process that accepted GET
// /phase, and its PID.
func (h *helper) phase() (pid int, phase string, err error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + h.Addr + "/phase")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, "", err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, "", fmt.Errorf("GET /phase: %s", resp.Status)
	}
	pid, err = strconv.Atoi(resp.Header.Get("X-Pid"))
	return pid, string(b), err
}

// waitPhase waits (bounded) until process pid answers GET /phase with want.
func (h *helper) waitPhase(pid int, want graceful.Phase) {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, phase, err := h.phase()
		if err == nil && got == pid && phase == want.String() {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("process %d never reported phase %v (last: pid %d %q, %v)", pid, want, got, phase, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// helperEvent is one line of the events file (see helperMain).
type helperEvent struct {
	pid  int
	name string
}

// events returns the events the helper's generations have recorded so far,
// in order.
func (h *helper) events() []helperEvent {
	h.t.Helper()
	b, err := os.ReadFile(h.eventsFile)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		h.t.Fatal(err)
	}
	var out []helperEvent
	for line := range strings.Lines(string(b)) {
		if !strings.HasSuffix(line, "\n") {
			break // being written
		}
		pid, name, ok := strings.Cut(strings.TrimSuffix(line, "\n"), " ")
		n, err := strconv.Atoi(pid)
		if !ok || err != nil {
			h.t.Fatalf("malformed event %q", line)
		}
		out = append(out, helperEvent{n, name})
	}
	return out
}

// pidsWith returns the PIDs that recorded event, in order.
func (h *helper) pidsWith(event string) []int {
	h.t.Helper()
	var out []int
	for _, e := range h.events() {
		if e.name == event {
			out = append(out, e.pid)
		}
	}
	return out
}

// waitEvent waits (bounded) until process pid has recorded event.
func (h *helper) waitEvent(pid int, event string) {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Contains(h.pidsWith(event), pid) {
		if time.Now().After(deadline) {
			h.t.Fatalf("process %d never recorded %q", pid, event)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitNewPID waits (bounded) until a process other than old has recorded
// event, and returns its PID.
func (h *helper) waitNewPID(old int, event string) int {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, pid := range h.pidsWith(event) {
			if pid != old {
				return pid
			}
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("no process but %d recorded %q", old, event)
		}
		time.Sleep(time.Millisecond)
	}
}

// noChildren waits (bounded) until the serving process has no live child.
func (h *helper) noChildren() {
	h.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(loadtest.Children(h.PID())) > 0 {
		if time.Now().After(deadline) {
			h.t.Fatalf("process %d still has children %v", h.PID(), loadtest.Children(h.PID()))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// pidOf returns the X-Pid of GET / through c.
func pidOf(t *testing.T, c *http.Client, url string) int {
	t.Helper()
	resp, err := c.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	pid, err := strconv.Atoi(resp.Header.Get("X-Pid"))
	require.NoError(t, err)
	return pid
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
