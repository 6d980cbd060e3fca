package graceful

import (
	"fmt"
	"sync"
	"sync/atomic"
)

// Phase is where a process is in its life. [Process.Phase] reports it, the
// control socket's status names it, and readiness, upgrades and the drain
// all read it; it changes in one place, by the transitions below only.
//
//	Starting    -> Checking     Run starts the pre-ready checks
//	Checking    -> Serving      the checks passed and the process declared itself ready
//	Checking    -> Probation    the checks passed; the previous process, which judges
//	                            this canary, hands it a share of the traffic
//	Checking    -> Draining     the checks failed, or a drain signal or ctx ended them
//	Probation   -> Serving      promoted: the process declared itself ready
//	Probation   -> HandingBack  rolled back (or told to stop): hands its connections
//	                            back to the previous process, which serves on, and drains
//	Probation   -> Draining     rolled back as the previous process drains too
//	Serving     -> Upgrading    Upgrade started a new process
//	Upgrading   -> Serving      the new process failed; nothing changed here
//	Upgrading   -> HandingOver  the new process is ready: this one drains, passing connections to it
//	Serving, Upgrading -> Delaying     drain signal or ctx done, with Options.DrainDelay
//	Delaying    -> HandingOver  an upgrade begun before the delay succeeded during it
//	Serving, Upgrading, Delaying -> Draining  drain signal, ctx done, a server stopped
//	HandingOver, HandingBack, Draining -> Done  Run returns
//
// Readiness is true in Probation, Serving and Upgrading only, and no transition leads
// back to them from Delaying or later: once the drain is on its way,
// readiness stays false.
type Phase int32

// The phases, in the order a process goes through them.
const (
	PhaseStarting    Phase = iota // New returned; Run not called yet
	PhaseChecking                 // Run is running the pre-ready checks
	PhaseProbation                // a canary: serving the share of traffic its predecessor hands it, until judged
	PhaseServing                  // ready and serving
	PhaseUpgrading                // serving while a new process starts
	PhaseDelaying                 // serving with readiness failing, for DrainDelay
	PhaseHandingOver              // a successor serves; draining, passing idle connections to it
	PhaseHandingBack              // a canary rolled back: draining, passing its connections back
	PhaseDraining                 // draining without a successor
	PhaseDone                     // Run returned
)

var phaseNames = [...]string{"starting", "checking", "probation", "serving", "upgrading", "delaying", "handing-over", "handing-back", "draining", "done"}

func (ph Phase) String() string {
	if ph >= 0 && int(ph) < len(phaseNames) {
		return phaseNames[ph]
	}
	return fmt.Sprintf("Phase(%d)", int32(ph))
}

// phaseTransitions is the table above.
var phaseTransitions = [...][]Phase{
	PhaseStarting:    {PhaseChecking},
	PhaseChecking:    {PhaseServing, PhaseProbation, PhaseDraining},
	PhaseProbation:   {PhaseServing, PhaseHandingBack, PhaseDraining},
	PhaseServing:     {PhaseUpgrading, PhaseDelaying, PhaseDraining},
	PhaseUpgrading:   {PhaseServing, PhaseHandingOver, PhaseDelaying, PhaseDraining},
	PhaseDelaying:    {PhaseHandingOver, PhaseDraining},
	PhaseHandingOver: {PhaseDone},
	PhaseHandingBack: {PhaseDone},
	PhaseDraining:    {PhaseDone},
}

func (ph Phase) allowed(to Phase) bool {
	if ph < 0 || int(ph) >= len(phaseTransitions) {
		return false
	}
	for _, p := range phaseTransitions[ph] {
		if p == to {
			return true
		}
	}
	return false
}

// ready reports whether readiness probes pass in this phase (checks aside).
func (ph Phase) ready() bool {
	return ph == PhaseServing || ph == PhaseUpgrading || ph == PhaseProbation
}

// draining reports whether the process is on its way out: readiness fails
// and no upgrade may start.
func (ph Phase) draining() bool { return ph >= PhaseDelaying }

// drainStarted reports whether the drain itself has begun: listeners
// closed, HTTP/1 responses carry "Connection: close".
func (ph Phase) drainStarted() bool { return ph >= PhaseHandingOver }

// lifecycle holds the phase and the channels that broadcast its changes.
// Each channel closes once, as a side effect of the transition that names
// it, in the order the drain needs:
//
//   - ready: entering Probation, or Serving from Checking: the process
//     serves traffic;
//   - draining: entering HandingOver, HandingBack or Draining, after beforeDrain (it
//     closes the listeners, so that a client told goodbye reconnects to the
//     successor, never to this process again) and onDrain (it starts the
//     goodbye spreading) ran; then upgraded, entering HandingOver.
type lifecycle struct {
	mu    sync.Mutex // serialises transitions
	phase atomic.Int32

	ready       chan struct{}
	upgraded    chan struct{}
	draining    chan struct{}
	beforeDrain func() // may be nil
	onDrain     func() // may be nil
}

func newLifecycle() *lifecycle {
	return &lifecycle{
		ready:    make(chan struct{}),
		upgraded: make(chan struct{}),
		draining: make(chan struct{}),
	}
}

// get returns the current phase. It takes no lock: the request path reads
// it.
func (l *lifecycle) get() Phase { return Phase(l.phase.Load()) }

// enter moves to phase to if the table allows it from the current phase,
// runs the transition's side effects, and returns the phase it left. It
// refuses (ok false, nothing changed) a transition not in the table.
func (l *lifecycle) enter(to Phase) (from Phase, ok bool) { return l.change(anyPhase, to) }

// move is enter, only from phase from.
func (l *lifecycle) move(from, to Phase) bool {
	_, ok := l.change(from, to)
	return ok
}

// anyPhase lets change start from whatever the current phase is.
const anyPhase Phase = -1

func (l *lifecycle) change(only, to Phase) (from Phase, ok bool) {
	l.mu.Lock()
	from = l.get()
	if (only != anyPhase && from != only) || !from.allowed(to) {
		l.mu.Unlock()
		return from, false
	}
	l.phase.Store(int32(to))
	l.mu.Unlock()

	// Side effects run outside the lock (they may read the phase), once:
	// no phase is entered twice.
	switch to {
	case PhaseProbation:
		close(l.ready)
	case PhaseServing:
		if from == PhaseChecking {
			close(l.ready)
		}
	case PhaseHandingOver, PhaseHandingBack, PhaseDraining:
		if l.beforeDrain != nil {
			l.beforeDrain()
		}
		if l.onDrain != nil {
			l.onDrain()
		}
		close(l.draining)
		if to == PhaseHandingOver {
			close(l.upgraded)
		}
	}
	return from, true
}
