package graceful

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Defaults used for the zero fields of [Options].
const (
	DefaultUpgradeTimeout = time.Minute
	DefaultDrainTimeout   = 30 * time.Second
	DefaultIdleGrace      = time.Second
)

// drainMargin is what a drain may take past DrainTimeout: closing what is
// left and returning.
const drainMargin = 5 * time.Second

// Errors callers may branch on. Every other error is wrapped under the
// "graceful:" prefix.
var (
	// ErrNotSupported is returned by [Process.Upgrade] where the platform
	// cannot pass file descriptors to a new process.
	ErrNotSupported = errors.New("graceful: upgrade not supported on this platform")
	// ErrUpgradeInProgress is returned when an upgrade is requested while one
	// is already running, or while the previous generation is still draining.
	ErrUpgradeInProgress = errors.New("graceful: upgrade already in progress")
	// ErrNotReady is returned by [Process.Upgrade] before the process has
	// declared itself ready.
	ErrNotReady = errors.New("graceful: process is not ready yet")
	// ErrDraining is returned by [Process.Upgrade] once the process has
	// started to drain.
	ErrDraining = errors.New("graceful: process is draining")
)

// Options configures a [Process]. The zero value is ready to use.
type Options struct {
	// Logger receives structured logs. Nil means silent.
	Logger *slog.Logger

	// UpgradeTimeout bounds how long a new process may take to become
	// ready, including its pre-ready checks. A child that misses it is
	// killed. Zero means [DefaultUpgradeTimeout].
	UpgradeTimeout time.Duration

	// DrainTimeout is the hard deadline of a drain: connections still open
	// when it expires, hijacked ones included, are closed. Zero means
	// [DefaultDrainTimeout].
	DrainTimeout time.Duration

	// IdleGrace is how long, after the listener stops accepting, an idle
	// keep-alive connection may still carry one more request (answered with
	// "Connection: close") before it is closed. Zero means
	// [DefaultIdleGrace]; it never extends past DrainTimeout.
	IdleGrace time.Duration

	// NoHandOff turns off the hand-off of idle connections: by default,
	// when an upgrade succeeds, the old process passes its idle plain
	// HTTP/1 keep-alive connections to the new one instead of closing them,
	// so that even clients that never retry see nothing. TLS and HTTP/2
	// connections are always drained by closing (close_notify, GOAWAY).
	NoHandOff bool

	// GoodbyeSpread spreads the goodbyes of long-lived streams (see
	// [Process.Goodbye]) evenly over this much of the drain, so that their
	// clients do not reconnect all at once. It must be shorter than
	// DrainTimeout. Zero means all at once.
	GoodbyeSpread time.Duration

	// DrainDelay is how long, after a drain signal or ctx ends, the process
	// keeps accepting and serving with readiness already failing, so load
	// balancers and kube-proxy stop routing to it before the listener
	// closes. A second drain signal ends it early. Upgrades skip it: the
	// successor shares the socket. Zero means no delay.
	DrainDelay time.Duration

	// CheckTimeout bounds each call of a health check. Zero means
	// [DefaultCheckTimeout].
	CheckTimeout time.Duration

	// CheckCache is how long the readiness probe reuses a check's result.
	// Zero means [DefaultCheckCache]; negative means never reuse.
	CheckCache time.Duration

	// PIDFile, when set, is written atomically with this process's PID once
	// it is ready, and removed when it drains without a successor. Its
	// directory must exist and be writable; [New] checks.
	PIDFile string

	// ControlSocket, when set, is the path of a Unix socket (mode 0600,
	// kept across upgrades) on which [Control] and the gracefulctl command
	// request an upgrade and learn its outcome: the truthful ExecReload= for
	// systemd. Only a peer with this process's user ID is answered. Linux
	// only; elsewhere [New] returns an error.
	ControlSocket string

	// UpgradeSignals trigger [Process.Upgrade] while [Process.Run] runs.
	// Nil means SIGHUP; a non-nil empty slice means none.
	UpgradeSignals []os.Signal

	// DrainSignals make [Process.Run] drain and return.
	// Nil means SIGTERM and SIGINT; a non-nil empty slice means none.
	DrainSignals []os.Signal
}

// Process is the running server's handle on its listeners, its registered
// servers and its upgrades. Create it with [New].
type Process struct {
	opts   Options
	log    *slog.Logger
	health *Health
	plat   platform

	mu       sync.Mutex
	entries  []entry
	started  bool
	stopping bool
	stopCtx  context.Context
	runs     sync.WaitGroup // every run and late stop
	exitOnce sync.Once
	exitC    chan struct{} // closed when the first run returns
	exitErr  error         // first run error, guarded by mu

	running      atomic.Bool
	upgrading    atomic.Bool
	readyC       chan struct{}
	drainingC    chan struct{}
	drainOnce    sync.Once
	upgradedC    chan struct{}
	upgradedOnce sync.Once
	upgrades     sync.WaitGroup // Upgrade attempts still running

	listeners []io.Closer // of served listeners, closed first in a drain

	injectMu  sync.Mutex
	injectors map[string]*injectListener // by listener address: where handed-off connections go

	hooksMu      sync.Mutex
	hooksStarted bool
	onDrain      []func()
	goodbyes     map[chan struct{}]struct{} // streams waiting for Goodbye
	hooks        sync.WaitGroup             // OnDrain hooks and the goodbye spreading
}

type entry struct {
	run  func() error
	stop func(context.Context) error
}

// created guards the process-wide state: inherited descriptors and the
// socket activation variables can be claimed only once per process.
var created atomic.Bool

// New prepares the process: it takes the listeners inherited from a parent
// process or passed by systemd socket activation. It does not block and
// traps no signal. New may be called once per process; a second call returns
// an error.
func New(opts Options) (*Process, error) {
	if opts.UpgradeTimeout < 0 || opts.DrainTimeout < 0 || opts.IdleGrace < 0 || opts.DrainDelay < 0 || opts.CheckTimeout < 0 || opts.GoodbyeSpread < 0 {
		return nil, errors.New("graceful: negative duration in Options (UpgradeTimeout, DrainTimeout, IdleGrace, DrainDelay, CheckTimeout, GoodbyeSpread)")
	}
	if opts.CheckTimeout == 0 {
		opts.CheckTimeout = DefaultCheckTimeout
	}
	if opts.CheckCache == 0 {
		opts.CheckCache = DefaultCheckCache
	}
	if opts.UpgradeTimeout == 0 {
		opts.UpgradeTimeout = DefaultUpgradeTimeout
	}
	if opts.DrainTimeout == 0 {
		opts.DrainTimeout = DefaultDrainTimeout
	}
	if opts.IdleGrace == 0 {
		opts.IdleGrace = DefaultIdleGrace
	}
	if opts.GoodbyeSpread >= opts.DrainTimeout {
		return nil, fmt.Errorf("graceful: GoodbyeSpread (%v) must be shorter than DrainTimeout (%v)", opts.GoodbyeSpread, opts.DrainTimeout)
	}
	if opts.UpgradeSignals == nil {
		opts.UpgradeSignals = []os.Signal{syscall.SIGHUP}
	}
	if opts.DrainSignals == nil {
		opts.DrainSignals = []os.Signal{syscall.SIGTERM, syscall.SIGINT}
	}
	if opts.PIDFile != "" {
		abs, err := filepath.Abs(opts.PIDFile)
		if err != nil {
			return nil, fmt.Errorf("graceful: PID file %q: %w", opts.PIDFile, err)
		}
		opts.PIDFile = abs
		if err := checkDir("PID file", abs); err != nil {
			return nil, err
		}
	}
	if opts.ControlSocket != "" {
		if !peerCredSupported {
			return nil, fmt.Errorf("graceful: ControlSocket %q: %w (it needs Linux peer credentials)", opts.ControlSocket, ErrNotSupported)
		}
		abs, err := filepath.Abs(opts.ControlSocket)
		if err != nil {
			return nil, fmt.Errorf("graceful: ControlSocket %q: %w", opts.ControlSocket, err)
		}
		opts.ControlSocket = abs
		if err := checkDir("control socket", abs); err != nil {
			return nil, err
		}
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if !created.CompareAndSwap(false, true) {
		return nil, errors.New("graceful: New called twice; inherited descriptors exist once per process")
	}
	p := &Process{
		opts: opts,
		log:  logger.With("pid", os.Getpid()), // two generations share a log

		health:    newHealth(opts.CheckTimeout, opts.CheckCache),
		exitC:     make(chan struct{}),
		readyC:    make(chan struct{}),
		drainingC: make(chan struct{}),
		upgradedC: make(chan struct{}),
		goodbyes:  make(map[chan struct{}]struct{}),
		injectors: make(map[string]*injectListener),
	}
	if err := p.initPlatform(); err != nil {
		created.Store(false)
		return nil, err
	}
	if opts.ControlSocket != "" {
		if err := p.listenControl(opts.ControlSocket); err != nil {
			p.stopPlatform() // tableflip allows one Upgrader per process: New cannot be retried
			return nil, err
		}
	}
	return p, nil
}

// Health returns the process's health state and probe handlers.
func (p *Process) Health() *Health { return p.health }

// Draining returns a channel closed once, when the process starts to drain.
// Long-lived handlers select on it to say goodbye in their own protocol.
// A nil *Process returns a nil channel, which never closes.
func (p *Process) Draining() <-chan struct{} {
	if p == nil {
		return nil
	}
	return p.drainingC
}

// Ready returns a channel closed once the process has declared itself ready.
func (p *Process) Ready() <-chan struct{} { return p.readyC }

type ctxKey struct{}

// FromContext returns the Process serving the request whose context is
// ctx, or nil when the request was not served through [Process.Serve].
func FromContext(ctx context.Context) *Process {
	p, _ := ctx.Value(ctxKey{}).(*Process)
	return p
}

// Add registers a server as a run/stop pair. run is started by
// [Process.Run] once the pre-ready checks pass and must block while serving.
// stop is called when the process drains, with a context that expires at the
// drain deadline; it must make run return. When any run returns, every stop
// is called. Added after Run has started, the pair starts at once. A nil
// stop means run watches [Process.Draining] itself.
func (p *Process) Add(run func() error, stop func(ctx context.Context) error) {
	if run == nil {
		panic("graceful: Add with nil run")
	}
	if stop == nil {
		stop = func(context.Context) error { return nil }
	}
	e := entry{run: run, stop: stop}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.entries = append(p.entries, e)
	if !p.started {
		return
	}
	p.startLocked(e)
	if p.stopping {
		ctx := p.stopCtx
		p.runs.Add(1)
		go func() {
			defer p.runs.Done()
			if err := e.stop(ctx); err != nil {
				p.log.Error("stop failed", "err", err)
			}
		}()
	}
}

func (p *Process) startLocked(e entry) {
	p.runs.Add(1)
	go func() {
		defer p.runs.Done()
		err := e.run()
		p.mu.Lock()
		if err != nil && !p.stopping && p.exitErr == nil {
			p.exitErr = err
		}
		p.mu.Unlock()
		p.exitOnce.Do(func() { close(p.exitC) })
	}()
}

// Run serves until the process is replaced or told to stop, then drains and
// returns. In order it: runs the pre-ready checks until they all pass (at
// most [Options.UpgradeTimeout]); starts every registered server; writes the
// PID file and declares the process ready, which completes the parent's
// upgrade if there is one. Then it waits for one of: an upgrade signal
// (starts [Process.Upgrade]); a drain signal or ctx done; a successful
// upgrade; a registered run returning. Whichever comes first, Run drains and
// returns after every run has returned. Signals are trapped only while Run
// runs. Run may be called once.
func (p *Process) Run(ctx context.Context) error {
	if !p.running.CompareAndSwap(false, true) {
		return errors.New("graceful: Run called twice")
	}
	upgradeSig := make(chan os.Signal, 1)
	drainSig := make(chan os.Signal, 1)
	if len(p.opts.UpgradeSignals) > 0 {
		signal.Notify(upgradeSig, p.opts.UpgradeSignals...)
		defer signal.Stop(upgradeSig)
	}
	if len(p.opts.DrainSignals) > 0 {
		signal.Notify(drainSig, p.opts.DrainSignals...)
		defer signal.Stop(drainSig)
	}
	defer p.upgrades.Wait()
	bgCtx, cancelBg := context.WithCancel(context.Background())
	defer cancelBg()

	if err := p.waitChecks(ctx, drainSig); err != nil {
		p.log.Error("pre-ready checks failed", "err", err)
		p.closeDraining()
		p.stopPlatform()
		hookCtx, cancel := context.WithTimeout(context.Background(), p.opts.DrainTimeout)
		p.waitHooks(hookCtx)
		cancel()
		return fmt.Errorf("graceful: not ready: %w", err)
	}
	p.mu.Lock()
	p.started = true
	for _, e := range p.entries {
		p.startLocked(e)
	}
	p.mu.Unlock()
	p.receiveHandoffs()

	if err := p.declareReady(); err != nil {
		p.log.Error("declaring ready failed", "err", err)
		return errors.Join(err, p.drain("ready failed"))
	}
	stopWatchdog := make(chan struct{})
	watchdogDone := make(chan struct{})
	go func() {
		defer close(watchdogDone)
		p.watchdog(stopWatchdog)
	}()
	defer func() {
		close(stopWatchdog)
		<-watchdogDone
	}()

	var reason string
loop:
	for {
		select {
		case sig := <-upgradeSig:
			p.upgrades.Add(1)
			go func() {
				defer p.upgrades.Done()
				p.log.Info("upgrade requested", "signal", sig.String())
				if err := p.Upgrade(bgCtx); err != nil {
					p.log.Error("upgrade failed; still serving", "err", err)
				}
			}()
		case sig := <-drainSig:
			reason = "signal " + sig.String()
			break loop
		case <-ctx.Done():
			reason = "context done"
			break loop
		case <-p.upgradedC:
			reason = "upgraded"
			break loop
		case <-p.exitC:
			reason = "a server stopped"
			break loop
		}
	}
	if reason != "upgraded" && reason != "a server stopped" {
		p.delayDrain(drainSig)
	}
	drainErr := p.drain(reason)
	p.waitHandoffs()
	p.mu.Lock()
	runErr := p.exitErr
	p.mu.Unlock()
	if runErr != nil {
		runErr = fmt.Errorf("graceful: server stopped: %w", runErr)
	}
	return errors.Join(runErr, drainErr)
}

// waitChecks runs the pre-ready checks until they pass, UpgradeTimeout
// passes, ctx ends or a drain signal arrives.
func (p *Process) waitChecks(ctx context.Context, drainSig <-chan os.Signal) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var sig os.Signal
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case sig = <-drainSig:
			cancel()
		case <-ctx.Done():
		}
	}()
	err := p.health.waitPass(ctx, p.opts.UpgradeTimeout)
	cancel()
	<-watched
	if sig != nil {
		return errors.Join(fmt.Errorf("stopped by signal %v before ready", sig), err)
	}
	return err
}

func (p *Process) declareReady() error {
	if p.opts.PIDFile != "" {
		if err := writePIDFile(p.opts.PIDFile); err != nil {
			return err
		}
	}
	if err := p.notifyReady(); err != nil {
		return fmt.Errorf("graceful: notify parent: %w", err)
	}
	p.health.setReady()
	close(p.readyC)
	p.log.Info("ready", "inherited", p.hasParent())
	if p.hasParent() {
		// Allowed with NotifyAccess=all; with a PID file the parent, still
		// the main process, sends the same.
		p.notify("MAINPID="+strconv.Itoa(os.Getpid()), "READY=1", status("serving (pid %d, upgraded)", os.Getpid()))
	} else {
		p.notify("READY=1", status("serving (pid %d)", os.Getpid()))
	}
	return nil
}

// delayDrain fails readiness and keeps serving for DrainDelay, so that load
// balancers stop sending traffic before the listener closes.
func (p *Process) delayDrain(drainSig <-chan os.Signal) {
	if p.opts.DrainDelay <= 0 {
		return
	}
	p.health.setDraining()
	p.log.Info("readiness failing; serving on before the drain", "delay", p.opts.DrainDelay)
	p.notify("STOPPING=1", status("readiness failing, draining in %v", p.opts.DrainDelay),
		extendTimeout(p.opts.DrainDelay+p.opts.DrainTimeout+drainMargin))
	t := time.NewTimer(p.opts.DrainDelay)
	defer t.Stop()
	select {
	case <-t.C:
	case sig := <-drainSig:
		p.log.Info("second drain signal: draining now", "signal", sig.String())
	case <-p.upgradedC:
	case <-p.exitC:
	}
}

// addListener registers a served listener to close when the drain starts.
func (p *Process) addListener(ln io.Closer) {
	p.mu.Lock()
	p.listeners = append(p.listeners, ln)
	p.mu.Unlock()
}

func (p *Process) closeListeners() {
	p.mu.Lock()
	lns := append([]io.Closer(nil), p.listeners...)
	p.mu.Unlock()
	for _, ln := range lns {
		ln.Close()
	}
}

func (p *Process) closeDraining() {
	p.drainOnce.Do(func() {
		p.health.setDraining()
		close(p.drainingC)
		p.startHooks()
	})
}

// drain stops every registered server within DrainTimeout.
func (p *Process) drain(reason string) error {
	start := time.Now()
	upgraded := p.isUpgraded()
	p.log.Info("draining", "reason", reason, "timeout", p.opts.DrainTimeout)
	if !upgraded {
		p.notify("STOPPING=1", status("draining (pid %d)", os.Getpid()), extendTimeout(p.opts.DrainTimeout+drainMargin))
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.DrainTimeout)
	defer cancel()
	p.mu.Lock()
	p.stopping = true // from now on a run returning is the drain, not a failure
	p.stopCtx = ctx
	p.mu.Unlock()
	// Stop accepting before any goodbye, so a client told to reconnect
	// reaches the successor (or nothing), never this process again.
	p.closeListeners()
	p.closeDraining()
	// Cancels an upgrade still in progress (its child is killed) and
	// releases the descriptors kept for children.
	p.stopPlatform()
	if !upgraded && p.opts.PIDFile != "" {
		removePIDFile(p.opts.PIDFile)
	}

	p.mu.Lock()
	entries := append([]entry(nil), p.entries...)
	started := p.started
	p.mu.Unlock()

	var errs []error
	if started {
		errC := make(chan error, len(entries))
		for _, e := range entries {
			go func() { errC <- e.stop(ctx) }()
		}
		for range entries {
			if err := <-errC; err != nil {
				errs = append(errs, err)
			}
		}
	}
	p.runs.Wait()
	p.waitHooks(ctx)
	p.log.Info("drained", "took", time.Since(start).Round(time.Millisecond))
	if len(errs) > 0 {
		return fmt.Errorf("graceful: drain: %w", errors.Join(errs...))
	}
	return nil
}

func (p *Process) isUpgraded() bool {
	select {
	case <-p.upgradedC:
		return true
	default:
		return false
	}
}

func (p *Process) isDraining() bool {
	select {
	case <-p.drainingC:
		return true
	default:
		return false
	}
}

// Upgrade starts the executable found on disk at this process's path as a
// child, passes it every listener, and blocks until the child is ready (nil),
// exits, or misses [Options.UpgradeTimeout] (an error naming the cause; the
// child is killed). On failure this process carries on serving unchanged. On
// success [Process.Run] drains and returns. A second call while one runs, or
// while the previous generation still drains, returns [ErrUpgradeInProgress]
// at once. ctx bounds only the wait: the attempt itself is bounded by
// UpgradeTimeout and still counts as in progress until it ends.
func (p *Process) Upgrade(ctx context.Context) error {
	if !p.upgrading.CompareAndSwap(false, true) {
		return ErrUpgradeInProgress
	}
	release := true
	defer func() {
		if release {
			p.upgrading.Store(false)
		}
	}()
	if p.health.draining.Load() { // set by DrainDelay and by the drain itself
		return ErrDraining
	}
	if err := p.upgradeAllowed(); err != nil {
		return err
	}
	select {
	case <-p.readyC:
	default:
		return ErrNotReady
	}
	start := time.Now()
	p.log.Info("upgrade starting")
	p.notify("RELOADING=1", monotonicUsec(), status("upgrading: starting a new process"))
	result := make(chan error, 1)
	release = false
	p.upgrades.Add(1)
	go func() {
		defer p.upgrades.Done()
		defer p.upgrading.Store(false)
		err := p.upgrade()
		if err == nil {
			p.upgradedOnce.Do(func() { close(p.upgradedC) })
			p.log.Info("upgrade done: new process ready", "took", time.Since(start).Round(time.Millisecond))
			if pid := p.successorPID(); pid != 0 {
				p.notify("MAINPID="+strconv.Itoa(pid), "READY=1", status("upgraded to pid %d; pid %d draining", pid, os.Getpid()))
			}
		} else {
			err = fmt.Errorf("graceful: upgrade: %w", err)
			p.notify("READY=1", status("upgrade failed, still serving (pid %d): %v", os.Getpid(), err))
		}
		result <- err
	}()
	select {
	case err := <-result:
		return err
	case <-ctx.Done():
		return fmt.Errorf("graceful: upgrade: stopped waiting: %w", ctx.Err())
	}
}

// checkDir fails when the directory that will hold path is missing or not
// writable, so New reports it instead of a failure after start-up.
func checkDir(what, path string) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".graceful-check-*")
	if err != nil {
		return fmt.Errorf("graceful: %s directory %s is not writable: %w", what, dir, err)
	}
	name := f.Name()
	f.Close()
	os.Remove(name)
	return nil
}

// writePIDFile replaces path atomically, so a reader never sees a partial
// or empty file.
func writePIDFile(path string) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("graceful: write PID file: %w", err)
	}
	defer os.Remove(f.Name())
	_, err = f.WriteString(strconv.Itoa(os.Getpid()) + "\n")
	if err == nil {
		err = f.Chmod(0o644)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("graceful: write PID file: %w", err)
	}
	return nil
}

// successorPID is the PID the PID file names once a successor is ready, or
// 0 without a PID file.
func (p *Process) successorPID() int {
	if p.opts.PIDFile == "" {
		return 0
	}
	if pid := readPIDFile(p.opts.PIDFile); pid != os.Getpid() {
		return pid
	}
	return 0
}

// readPIDFile returns the PID that path names, or 0.
func readPIDFile(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0
	}
	return pid
}

// removePIDFile removes path only while it still names this process.
func removePIDFile(path string) {
	if readPIDFile(path) == os.Getpid() {
		os.Remove(path)
	}
}
