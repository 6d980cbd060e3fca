package graceful

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
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

	DefaultCanaryShare          = 0.1
	DefaultProbationMinRequests = 100
	DefaultProbationErrorMargin = 0.01
)

// drainMargin is what a drain may take past DrainTimeout: closing what is
// left and returning.
const drainMargin = 5 * time.Second

// eventFlushTimeout is how long Run waits for OnEvent to take the last
// events.
const eventFlushTimeout = 5 * time.Second

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
	// ErrRolledBack is wrapped by the error of an [Process.Upgrade] whose
	// new process was rolled back at the end of its probation, or died
	// during it (see [Options.Probation]); the error names the verdict and
	// its figures.
	ErrRolledBack = errors.New("graceful: rolled back")
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
	// "Connection: close") before it is closed. It is also how long a
	// request that has begun to arrive during the drain has to arrive in
	// full when the http.Server sets neither ReadHeaderTimeout nor
	// ReadTimeout. Zero means [DefaultIdleGrace]; it never extends past
	// DrainTimeout.
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
	// kept across upgrades) on which package control and the gracefulctl command
	// request an upgrade and learn its outcome: the truthful ExecReload= for
	// systemd. Only a peer with this process's user ID is answered. Linux
	// only; elsewhere [New] returns an error.
	ControlSocket string

	// UpgradeSignals trigger [Process.Upgrade] while [Process.Run] runs.
	// Nil means SIGHUP; a non-nil empty slice means none.
	UpgradeSignals []os.Signal

	// OnEvent, when set, is told of each upgrade and drain as it happens
	// (see [Event]): upgrades started, succeeded and failed, drains started
	// and finished with what became of their connections, and, in a new
	// process, how its predecessor drained. It is called on a goroutine of
	// its own, one event at a time and in order, never on the upgrade or
	// drain path: a slow OnEvent delays only later events, and past 1,024
	// waiting ones, new ones are dropped and counted ([Event.Dropped]).
	// [Process.Run] waits up to 5 s for the last ones before it returns.
	// Nil costs nothing.
	OnEvent func(Event)

	// Version names the running build in [Process.Status] (the control
	// socket's status). Empty means the main module's version and VCS
	// revision, from the binary's build information.
	Version string

	// Probation, when set, puts each new version on trial before it takes
	// over: once its pre-ready checks pass, this process hands it
	// CanaryShare of the connections (new ones, and idle keep-alive ones,
	// each chosen once) and serves the rest itself, for Probation. Then it
	// compares what both served over that window and promotes the new
	// process (the usual hand-over) or rolls it back: the canary hands
	// every connection back as it goes idle, finishes its requests and
	// exits, and [Process.Upgrade] fails with [ErrRolledBack] and the
	// figures. If the canary dies, this process serves the connections it
	// held idle or had not read (it keeps a duplicate of each descriptor it
	// handed over): only the canary's requests in flight are lost; if this
	// process dies, the canary serves alone, unjudged. See
	// [ProbationStats] for the verdict, and for the window's
	// extension while traffic is too thin to judge. It must be shorter
	// than UpgradeTimeout, which bounds the whole attempt: the window is cut
	// short when slow checks would leave less than half of the time after
	// it for the verdict and a rollback. Zero means no probation: the new
	// process takes over as soon as it is ready. Connections are split
	// under [Process.Serve] only: the canary's other listeners accept
	// nothing until it is promoted.
	Probation time.Duration

	// CanaryShare is the fraction of connections (0 to 1) the canary
	// serves during Probation. Zero means [DefaultCanaryShare].
	CanaryShare float64

	// ProbationMinRequests is how many requests each process must have
	// served in the window before its rates count: with fewer, the canary
	// is judged only on whether it ran (see [ProbationStats]). Zero means
	// [DefaultProbationMinRequests].
	ProbationMinRequests int

	// ProbationErrorMargin is by how much (a fraction: 0.01 is one point)
	// the canary's rate of failed requests (5xx responses and handler
	// panics) may exceed the old process's before it is rolled back; the
	// difference must also be significant (see [ProbationStats]). Zero
	// means [DefaultProbationErrorMargin]; negative means no margin.
	ProbationErrorMargin float64

	// ProbationLatencyRatio, when set, also rolls the canary back when its
	// p99 latency is more than this many times the old process's (1.5:
	// half as slow again). Zero means latency is not judged.
	ProbationLatencyRatio float64

	// ProbationJudge, when set, is a criterion of the user's own, asked
	// after the built-in ones passed: a non-nil error rolls the canary
	// back, with the error's text as the reason.
	ProbationJudge func(canary, stable ProbationStats) error

	// TicketKeyRotation is how often the TLS session ticket key of the
	// servers [Process.Serve] runs with a TLSConfig rotates. graceful keeps
	// these keys (the last 24 decrypt) and passes them to each new process
	// with the upgrade, so that a client resumes its TLS session across
	// upgrades instead of paying a full handshake. Zero means
	// [DefaultTicketKeyRotation]; negative leaves the keys to crypto/tls
	// (each process makes its own: no session survives an upgrade); it must
	// be a second or more. A TLSConfig with SessionTicketsDisabled,
	// SessionTicketKey, WrapSession or UnwrapSession set is left alone; keys
	// set with its SetSessionTicketKeys cannot be seen, so a user who shares
	// keys that way sets this negative.
	TicketKeyRotation time.Duration

	// MaxStateSize bounds the state (see [Process.OfferState]) a new
	// process reads from its predecessor, counting the payloads together
	// (not the file's framing): more is refused whole, logged, and the
	// process starts cold. A process whose own payloads exceed it does not
	// write them at all (a successor with the same limit would refuse
	// them). Zero means [DefaultMaxStateSize].
	MaxStateSize int64

	// DrainSignals make [Process.Run] drain and return. One that arrives
	// while an upgrade attempt runs waits for its outcome (a second one
	// cancels the attempt); if the new process became ready, it is asked to
	// drain too. Nil means SIGTERM and SIGINT; a non-nil empty slice means
	// none.
	DrainSignals []os.Signal
}

// Process is the running server's handle on its listeners, its registered
// servers and its upgrades. Create it with [New].
type Process struct {
	opts   Options
	log    *slog.Logger
	life   *lifecycle
	health *Health
	plat   platform
	group  *group

	// The hand-off (handoff.go): to the successor, from the parent, and
	// the inboxes where what arrives is served. A nil handoff cannot.
	toSuccessor *handoff
	fromParent  *handoff
	inboxes     *inboxes

	mu          sync.Mutex
	listeners   map[any]io.Closer                 // by socket: closed first in a drain
	listenOrder []any                             // the sockets, in registration order
	drainCtx    context.Context                   // set when the drain starts: its deadline
	drainCancel context.CancelFunc                // releases drainCtx
	goodbyes    map[*func()]bool                  // registered goodbyes; true: counted in the drain's figures
	goodbyeOf   map[context.Context]chan struct{} // Goodbye's channel, per stream
	goodbyeAt   bool                              // the drain started: new goodbyes are said at once

	attempts     sync.WaitGroup // Upgrade attempts still running
	attemptEnded chan struct{}  // receives after each attempt's outcome (buffered)
	parentAsked  chan struct{}  // closed when the parent asks us to drain
	askedOnce    sync.Once
	attemptsOver bool           // Run has waited for them: no more (guarded by mu)
	drainAsked   bool           // a drain was requested: no new attempt (guarded by mu)
	spreading    sync.WaitGroup // the goodbye spreading

	// What Status and the events report (events.go).
	record   *record
	events   *eventQueue  // nil without Options.OnEvent
	trackers []*tracker   // every served listener's (guarded by mu)
	goodbyed atomic.Int64 // goodbyes said

	drainInFlight atomic.Int64 // requests in flight as the drain began

	tickets *ticketKeys // nil with a negative TicketKeyRotation (tickets.go)
	state   states      // offered to the successor, received from the parent (state.go)
	streams streamSet   // OnStream's handlers and the streams received (streams.go)

	successorStreams atomic.Pointer[map[string]bool] // the kinds of stream the new process takes
	parentStreams    atomic.Pointer[map[string]bool] // a canary's: the kinds the old process takes back

	// Probation (probation.go).
	stats     *requestStats         // nil unless a probation may judge this process
	trial     atomic.Pointer[trial] // the probation of the attempt in progress
	canary    *canary               // set at New when this process is on probation
	drainBy   time.Time             // a canary's drain ends by then (guarded by mu)
	board     atomic.Pointer[board] // a canary's, until promoted (probation_board.go)
	lastHello atomic.Int64          // the PID the new process said, with a receive loop

	// parentDelivered tells the inboxes that the parent will hand over
	// nothing more: its channel ended, or (a canary rolled back) it said
	// so. Once. parentDone is closed then.
	parentDelivered func()
	parentDone      chan struct{}
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
	if err := opts.checkProbation(); err != nil {
		return nil, err
	}
	if opts.MaxStateSize < 0 {
		return nil, fmt.Errorf("graceful: MaxStateSize %d is negative", opts.MaxStateSize)
	}
	if opts.MaxStateSize == 0 {
		opts.MaxStateSize = DefaultMaxStateSize
	}
	if opts.TicketKeyRotation > 0 && opts.TicketKeyRotation < time.Second {
		return nil, fmt.Errorf("graceful: TicketKeyRotation %v is under a second", opts.TicketKeyRotation)
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
	logger = logger.With("pid", os.Getpid()) // two generations share a log
	p := &Process{
		opts:      opts,
		log:       logger,
		life:      newLifecycle(),
		inboxes:   newInboxes(logger),
		group:     newGroup(logger),
		goodbyes:  make(map[*func()]bool),
		goodbyeOf: make(map[context.Context]chan struct{}),
		listeners: make(map[any]io.Closer),

		attemptEnded: make(chan struct{}, 1),
		parentAsked:  make(chan struct{}),
		record:       newRecord(buildName(opts.Version)),
	}
	if opts.OnEvent != nil {
		p.events = newEventQueue(opts.OnEvent)
	}
	if opts.TicketKeyRotation >= 0 {
		p.tickets = newTicketKeys(cmp.Or(opts.TicketKeyRotation, DefaultTicketKeyRotation))
	}
	p.parentDone = make(chan struct{})
	p.parentDelivered = sync.OnceFunc(func() {
		p.inboxes.finish()
		close(p.parentDone)
	})
	p.health = newHealth(p.life, opts.CheckTimeout, opts.CheckCache)
	p.life.beforeDrain = p.beginDrain
	p.life.onDrain = p.spreadGoodbyes
	if err := p.initPlatform(); err != nil {
		created.Store(false)
		return nil, err
	}
	if p.fromParent != nil {
		p.fromParent.onControl = p.controlMessage
	}
	if p.takesBack() {
		p.toSuccessor.onControl = p.controlMessage
		p.inboxes.addSource()
	}
	if p.takesBack() || p.canary != nil {
		p.stats = &requestStats{}
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

// Phase returns where the process is in its life. It changes only as the
// table on [Phase] allows; a caller that needs to wait for a phase should
// use [Process.Ready] or [Process.Draining].
func (p *Process) Phase() Phase { return p.life.get() }

// Ready returns a channel closed once, when the process starts serving
// traffic: it entered [PhaseServing], or, as a canary on probation (see
// [Options.Probation]), [PhaseProbation], from which it may still be rolled
// back. Work that must run in one process only should wait for
// [PhaseServing] in [Process.Status] or for the upgrade's success instead.
func (p *Process) Ready() <-chan struct{} { return p.life.ready }

// Draining returns a channel closed once, when the process starts to drain
// ([PhaseHandingOver] or [PhaseDraining]), after its listeners have stopped
// accepting. Long-lived handlers select on it to say goodbye in their own
// protocol. A nil *Process returns a nil channel, which never closes.
func (p *Process) Draining() <-chan struct{} {
	if p == nil {
		return nil
	}
	return p.life.draining
}

type ctxKey struct{}

// FromContext returns the Process serving the request whose context is
// ctx, or nil when the request was not served through [Process.Serve] or
// [Process.ServeConns].
func FromContext(ctx context.Context) *Process {
	p, _ := ctx.Value(ctxKey{}).(*Process)
	return p
}

// Add registers a server as a run/stop pair. run is started by
// [Process.Run] once the pre-ready checks pass and must block while serving.
// stop is called when the process drains, with a context that expires at the
// drain deadline; it must make run return. When any run returns, every stop
// is called. Added after Run has started, the pair starts at once (and is
// stopped at once if the drain has begun). A nil stop means run watches
// [Process.Draining] itself.
func (p *Process) Add(run func() error, stop func(ctx context.Context) error) {
	if run == nil {
		panic("graceful: Add with nil run")
	}
	if stop == nil {
		stop = func(context.Context) error { return nil }
	}
	p.group.add(entry{run: run, stop: stop})
}

// Run serves until the process is replaced or told to stop, then drains and
// returns. In order it: runs the pre-ready checks until they all pass (at
// most [Options.UpgradeTimeout]); starts every registered server; writes the
// PID file and declares the process ready, which completes the parent's
// upgrade if there is one. Then it waits for one of: an upgrade signal
// (starts [Process.Upgrade]); a drain signal or ctx done (see
// [Options.DrainSignals] for one during an upgrade); a successful upgrade;
// a registered run returning; the previous process asking it to drain.
// Whichever comes first, Run drains and returns after every run has
// returned. Signals are trapped only while Run runs. Run may be called
// once.
func (p *Process) Run(ctx context.Context) error {
	if _, ok := p.life.enter(PhaseChecking); !ok {
		return errors.New("graceful: Run called twice")
	}
	defer p.life.enter(PhaseDone)
	defer func() {
		if !p.events.flush(eventFlushTimeout) {
			p.log.Warn("OnEvent still busy; returning without its last events")
		}
	}()
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
	defer func() {
		p.mu.Lock()
		p.attemptsOver = true
		p.mu.Unlock()
		p.attempts.Wait()
	}()
	bgCtx, cancelBg := context.WithCancel(context.Background())
	defer cancelBg()

	if err := p.waitChecks(ctx, drainSig); err != nil {
		p.log.Error("pre-ready checks failed", "err", err)
		p.life.enter(PhaseDraining)
		return errors.Join(fmt.Errorf("graceful: not ready: %w", err), p.drain("not ready"))
	}
	p.group.start()
	p.fromParent.receive(p.deliverFromParent, p.parentDelivered)
	if p.takesBack() {
		// Connections and streams a canary hands back, and its messages.
		p.toSuccessor.receive(p.deliver, func() {})
	}
	if p.canary != nil {
		if promoted, reason, alone := p.serveProbation(ctx, drainSig); !promoted {
			if alone {
				p.life.enter(PhaseDraining) // the old process drains too: nothing to hand back to
			} else {
				p.life.enter(PhaseHandingBack)
			}
			err := p.drain(reason)
			p.fromParent.close()
			p.fromParent.wait()
			return errors.Join(fmt.Errorf("%w %s", ErrRolledBack, reason), err)
		}
	}
	if err := p.declareReady(); err != nil {
		p.log.Error("declaring ready failed", "err", err)
		p.life.enter(PhaseDraining)
		return errors.Join(err, p.drain("ready failed"))
	}
	background, background2 := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(background)
		p.watchdog(bgCtx.Done())
	}()
	go func() {
		defer close(background2)
		p.waitParent(bgCtx) // logs the previous generation's exit
	}()
	defer func() {
		cancelBg()
		<-background
		<-background2
	}()

	var reason string
loop:
	for {
		select {
		case sig := <-upgradeSig:
			p.attempts.Add(1)
			go func() {
				defer p.attempts.Done()
				p.log.Info("upgrade requested", "signal", sig.String())
				// Not bounded by Run's own lifetime: Run waits for every
				// attempt, and the outcome logged must be the attempt's.
				if err := p.Upgrade(context.Background()); err != nil {
					p.logUpgradeFailure(err)
				}
			}()
		case sig := <-drainSig:
			reason = "signal " + sig.String()
			p.drainRequested(drainSig)
			break loop
		case <-ctx.Done():
			reason = "context done"
			p.drainRequested(drainSig)
			break loop
		case <-p.parentAsked:
			reason = "the previous process was told to stop during the upgrade"
			p.drainRequested(drainSig)
			break loop
		case <-p.life.upgraded:
			reason = "upgraded"
			break loop
		case <-p.group.exited:
			reason = "a server stopped"
			break loop
		}
	}
	if p.life.get() == PhaseHandingOver {
		reason = "upgraded" // the servers stop as the hand-over begins: not "a server stopped"
	}
	p.life.enter(PhaseDraining) // refused if an upgrade got there first: HandingOver
	drainErr := p.drain(reason)
	p.fromParent.wait()
	runErr := p.group.failure()
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

// declareReady writes the PID file, completes the parent's upgrade and
// enters Serving.
func (p *Process) declareReady() error {
	if p.opts.PIDFile != "" {
		if err := writePIDFile(p.opts.PIDFile); err != nil {
			return err
		}
	}
	if kinds := p.streamKinds(); kinds != "" && p.fromParent != nil {
		// Before Ready: the parent reads it before it hands over.
		if err := p.fromParent.sendControl(streamsMessage+" "+kinds, time.Second); err != nil {
			p.log.Warn("cannot tell the previous process the streams we take", "err", err)
		}
	}
	if err := p.notifyReady(); err != nil {
		if !p.parentGone(time.Second) {
			return fmt.Errorf("graceful: notify parent: %w", err)
		}
		// The parent died (SIGKILL, a crash) before it learned we are
		// ready: it holds nothing any more, and we hold the listeners.
		// Leaving now would leave nothing listening.
		p.log.Warn("the previous process is gone: serving alone", "err", err)
	}
	p.life.enter(PhaseServing)
	if p.canary != nil {
		p.canary.once.Do(func() { close(p.canary.open) })
		p.board.Store(nil) // promoted: the old process keeps no duplicates any more
	}
	p.declaredServing()
	p.log.Info("ready", "inherited", p.hasParent(), "generation", p.generation())
	if p.hasParent() {
		// Allowed with NotifyAccess=all; with a PID file the parent, still
		// the main process, sends the same.
		p.notify("MAINPID="+strconv.Itoa(os.Getpid()), "READY=1", status("serving (pid %d, upgraded)", os.Getpid()))
	} else {
		p.notify("READY=1", status("serving (pid %d)", os.Getpid()))
	}
	return nil
}

// entry is one registered run/stop pair.
type entry struct {
	run  func() error
	stop func(context.Context) error
}

// group runs the registered pairs, in the manner of oklog/run: when one run
// returns every stop is called, and the group is over when every run and
// stop has returned.
type group struct {
	log *slog.Logger

	mu       sync.Mutex
	idle     *sync.Cond // signalled when active drops to 0
	entries  []entry
	started  bool
	stopCtx  context.Context // set by beginStop: a run returning is now the drain
	over     bool            // wait returned: a late Add is ignored
	active   int             // runs and stops still running
	err      error           // the first run's error before stopping
	stopErrs []error
	exitOnce sync.Once
	exited   chan struct{} // closed when the first run returns
}

func newGroup(log *slog.Logger) *group {
	g := &group{log: log, exited: make(chan struct{})}
	g.idle = sync.NewCond(&g.mu)
	return g
}

// add registers e. Once started it runs at once, and once the drain has
// begun it is stopped at once too. After wait has returned it is ignored.
func (g *group) add(e entry) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.over {
		g.log.Warn("server added after Run returned; ignored")
		return
	}
	g.entries = append(g.entries, e)
	if !g.started {
		return
	}
	g.startLocked(e)
	if g.stopCtx != nil {
		g.goLocked(func() { g.stopOne(e) })
	}
}

// start starts every run registered so far, and later ones as they come.
func (g *group) start() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.started = true
	for _, e := range g.entries {
		g.startLocked(e)
	}
}

// goLocked runs f in a goroutine the group waits for.
func (g *group) goLocked(f func()) {
	g.active++
	go func() {
		defer func() {
			g.mu.Lock()
			if g.active--; g.active == 0 {
				g.idle.Broadcast()
			}
			g.mu.Unlock()
		}()
		f()
	}()
}

func (g *group) startLocked(e entry) {
	g.goLocked(func() {
		err := e.run()
		g.mu.Lock()
		if err != nil && g.stopCtx == nil && g.err == nil {
			g.err = err
		}
		g.mu.Unlock()
		g.exitOnce.Do(func() { close(g.exited) })
	})
}

func (g *group) stopOne(e entry) {
	g.mu.Lock()
	ctx := g.stopCtx
	g.mu.Unlock()
	if err := e.stop(ctx); err != nil {
		g.mu.Lock()
		g.stopErrs = append(g.stopErrs, err)
		g.mu.Unlock()
	}
}

// beginStop marks the start of the drain (from now on a run returning is
// the drain, not a failure), runs first, then calls the stop of every pair
// registered so far, each in its own goroutine, with the drain's context;
// a pair added meanwhile is stopped by add. Call it once.
func (g *group) beginStop(ctx context.Context, first func()) {
	g.mu.Lock()
	g.stopCtx = ctx
	var entries []entry
	if g.started {
		entries = append(entries, g.entries...)
	}
	g.mu.Unlock()
	first()
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, e := range entries {
		g.goLocked(func() { g.stopOne(e) })
	}
}

// wait waits for every run and stop to return, and returns the stops'
// errors.
func (g *group) wait() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.active > 0 {
		g.idle.Wait()
	}
	g.over = true
	return errors.Join(g.stopErrs...)
}

// failure returns the error of the first run that returned before the
// drain, if any.
func (g *group) failure() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.err
}
