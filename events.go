package graceful

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// This file holds what an operator sees of the upgrades: the events
// ([Options.OnEvent]) and the status record ([Process.Status]) that
// generations pass on to each other, so that the serving process knows the
// upgrades that led to it and the drain of the process it replaced.

// EventKind says what an [Event] reports.
type EventKind int

// The event kinds.
const (
	// EventServing: this process is ready and serving (PID, Generation).
	EventServing EventKind = iota + 1
	// EventUpgradeStarted: this process (PID) started a new one.
	EventUpgradeStarted
	// EventUpgradeSucceeded: the new process NewPID became ready, Duration
	// after the upgrade started; process PID hands over to it and drains.
	// Both report it: the old process as it happens, the new one once it
	// serves.
	EventUpgradeSucceeded
	// EventUpgradeFailed: the new process (NewPID, if it started) failed,
	// Duration after the upgrade started, for the reason Err (which wraps
	// [ErrRolledBack] when a probation rolled it back); process PID serves
	// on, unless it is draining.
	EventUpgradeFailed
	// EventDrainStarted: process PID began to drain, for Reason; Drain.InFlight
	// requests were being served.
	EventDrainStarted
	// EventDrainFinished: process PID (of Generation) ended its drain,
	// Duration after it began, with what became of its connections (Drain).
	// After an upgrade the successor reports it too, once told: the process
	// that serves, and is watched, learns how its predecessor drained.
	EventDrainFinished
	// EventProbation: this process (PID, Generation) is a new version on
	// probation (see [Options.Probation]): it serves the share of the
	// connections the old process hands it, until promoted (then
	// EventServing) or rolled back.
	EventProbation
)

var eventNames = [...]string{"", "serving", "upgrade-started", "upgrade-succeeded", "upgrade-failed", "drain-started", "drain-finished", "probation"}

func (k EventKind) String() string {
	if k > 0 && int(k) < len(eventNames) {
		return eventNames[k]
	}
	return "EventKind(" + strconv.Itoa(int(k)) + ")"
}

// Event is one step of an upgrade or a drain, passed to [Options.OnEvent].
type Event struct {
	Kind       EventKind
	Time       time.Time
	PID        int           // the process the event is about (for upgrades, the old one)
	Generation int           // PID's generation: 1 for a process started cold, one more at each upgrade
	NewPID     int           // upgrade events: the new process; 0 if unknown
	Duration   time.Duration // see the kind
	Err        error         // EventUpgradeFailed: why
	Reason     string        // EventDrainStarted: what started the drain
	Drain      DrainStats    // EventDrainStarted (InFlight), EventDrainFinished
	// Totals are the counts after this event, across generations (see
	// [Status]): a metrics exporter can expose them as counters that do not
	// restart at each upgrade.
	Totals Totals
	// Dropped is how many events were not delivered before this one because
	// OnEvent did not keep up.
	Dropped int
}

// DrainStats is what became of one drain's connections. InFlight counts
// the connections with a request in flight or hijacked (WebSocket) under
// [Process.Serve] (an HTTP/2 connection with streams counts once) and the
// connections being handled under [Process.ServeConns].
type DrainStats struct {
	Duration  time.Duration `json:"duration_ns"`
	InFlight  int           `json:"in_flight"`  // requests being served as the drain began (see below)
	Handed    int           `json:"handed"`     // idle connections passed to the new process
	NotHanded int           `json:"not_handed"` // connections that could not be passed on, closed instead
	Retired   int           `json:"retired"`    // idle keep-alive connections closed cleanly (FIN)
	Expired   int           `json:"expired"`    // connections whose request did not arrive within the drain's bound
	Forced    int           `json:"forced"`     // connections closed at the drain deadline
	Goodbyes  int           `json:"goodbyes"`   // long-lived streams told goodbye ([Process.Goodbye], ServeConns)
}

func (d *DrainStats) add(o DrainStats) {
	d.Duration += o.Duration
	d.InFlight += o.InFlight
	d.Handed += o.Handed
	d.NotHanded += o.NotHanded
	d.Retired += o.Retired
	d.Expired += o.Expired
	d.Forced += o.Forced
	d.Goodbyes += o.Goodbyes
}

// Outcome is how an upgrade ended.
type Outcome string

// The outcomes of an upgrade.
const (
	OutcomeInProgress Outcome = "in-progress"
	OutcomeSucceeded  Outcome = "succeeded"
	OutcomeFailed     Outcome = "failed"
	OutcomeRolledBack Outcome = "rolled-back" // failed its probation, or died during it: see [ErrRolledBack]
)

// UpgradeRecord is one upgrade, as [Status] keeps it.
type UpgradeRecord struct {
	Started    time.Time     `json:"started"`
	Duration   time.Duration `json:"duration_ns"` // until the new process was ready, or failed
	Outcome    Outcome       `json:"outcome"`
	Err        string        `json:"error,omitempty"`
	OldPID     int           `json:"old_pid"`
	NewPID     int           `json:"new_pid,omitempty"`
	Generation int           `json:"generation"`      // the new process's
	Drain      *DrainStats   `json:"drain,omitempty"` // the old process's drain, once the new one heard of it
}

// Totals count upgrades and drains since the first generation started cold.
type Totals struct {
	Succeeded     int        `json:"upgrades_succeeded"`
	Failed        int        `json:"upgrades_failed"`      // not counting those rolled back
	RolledBack    int        `json:"upgrades_rolled_back"` // see [Options.Probation]
	Drains        int        `json:"drains"`
	Drain         DrainStats `json:"drain"` // summed over those drains
	EventsDropped int        `json:"events_dropped"`
}

// Status describes the process and the upgrades that led to it.
type Status struct {
	PID        int             `json:"pid"`
	Generation int             `json:"generation"`
	Build      string          `json:"build"`
	Executable string          `json:"executable,omitempty"` // the file an upgrade starts: os.Args[0], absolute
	Started    time.Time       `json:"started"`
	Phase      Phase           `json:"phase"`
	Upgrades   []UpgradeRecord `json:"upgrades"` // the last ones (at most 10), oldest first, across generations
	Totals     Totals          `json:"totals"`
}

// maxHistory is how many upgrades a Status keeps.
const maxHistory = 10

// MarshalText names the phase, as String does.
func (ph Phase) MarshalText() ([]byte, error) { return []byte(ph.String()), nil }

// UnmarshalText reads a phase's name.
func (ph *Phase) UnmarshalText(b []byte) error {
	if i := slices.Index(phaseNames[:], string(b)); i >= 0 {
		*ph = Phase(i)
		return nil
	}
	return fmt.Errorf("graceful: unknown phase %q", b)
}

// Status returns a snapshot of the process: its PID, generation, build,
// start time and phase, the last upgrades (including those of earlier
// generations) and the totals. It does not block on an upgrade or a drain.
func (p *Process) Status() Status {
	p.record.mu.Lock()
	defer p.record.mu.Unlock()
	s := p.record.status
	s.Phase = p.life.get()
	s.Upgrades = slices.Clone(s.Upgrades)
	for i, u := range s.Upgrades {
		if u.Drain != nil {
			d := *u.Drain
			s.Upgrades[i].Drain = &d
		}
	}
	s.Totals.EventsDropped = p.events.droppedTotal()
	return s
}

// record is the Status being kept, and the attempt in progress.
type record struct {
	mu      sync.Mutex
	status  Status
	attempt int // index in status.Upgrades of the attempt in progress; -1 if none

	// A predecessor's drain report that came before we served waits
	// here, so that its event follows our serving one.
	serving bool
	pending *drainReport
}

func newRecord(build string) *record {
	return &record{status: Status{PID: os.Getpid(), Generation: 1, Build: build, Executable: executable(), Started: time.Now()}, attempt: -1}
}

// executable returns the absolute path of the file an upgrade starts:
// os.Args[0] as the upgrade finds it (links not followed: a deploy
// replaces what the upgrade runs), or "" if it cannot be found.
func executable() string {
	name := os.Args[0]
	if !strings.Contains(name, "/") {
		found, err := exec.LookPath(name)
		if err != nil {
			return ""
		}
		name = found
	}
	abs, err := filepath.Abs(name)
	if err != nil {
		return ""
	}
	return abs
}

// buildName names the running binary: version, else the main module's
// version and VCS revision.
func buildName(version string) string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	name := bi.Main.Version
	var rev, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				modified = "+dirty"
			}
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev != "" {
		name += " (" + rev + modified + ")"
	}
	if name == "" {
		return "unknown"
	}
	return name
}

// appendLocked adds u to the history, keeping the last maxHistory.
func (r *record) appendLocked(u UpgradeRecord) int {
	r.status.Upgrades = append(r.status.Upgrades, u)
	if over := len(r.status.Upgrades) - maxHistory; over > 0 {
		r.status.Upgrades = slices.Delete(r.status.Upgrades, 0, over)
		r.attempt -= over
	}
	return len(r.status.Upgrades) - 1
}

// handedState is what a process passes to the new one it starts: where the
// new one stands, and the record so far, the attempt that starts it last.
type handedState struct {
	Generation int             `json:"generation"`
	Upgrades   []UpgradeRecord `json:"upgrades"`
	Totals     Totals          `json:"totals"`
	Tickets    *ticketState    `json:"tickets,omitempty"` // TLS session ticket keys (tickets.go)
}

// drainReport is what a process that handed over tells its successor once
// its drain has ended.
type drainReport struct {
	PID        int        `json:"pid"`
	Generation int        `json:"generation"`
	Drain      DrainStats `json:"drain"`
}

// Control messages on the hand-off channel (see handoff.go): a NUL byte,
// a word, and for some a JSON body after a space. No listener key starts
// with a NUL byte.
const (
	drainRequest   = "\x00drain"   // to the successor: drain, as if signalled
	drainedMessage = "\x00drained" // to the successor: a drainReport
	stateMessage   = "\x00state"   // to a new process, before it starts: a handedState
	helloMessage   = "\x00hello"   // to the parent, at New: our PID

	stateFileMessage = "\x00statefile" // to a new process, before it starts, with the state file (state.go)
)

// beginAttempt records an upgrade attempt that starts now and returns the
// state to pass to the new process.
func (p *Process) beginAttempt(start time.Time) []byte {
	r := p.record
	r.mu.Lock()
	r.attempt = r.appendLocked(UpgradeRecord{Started: start, Outcome: OutcomeInProgress, OldPID: os.Getpid(), Generation: r.status.Generation + 1})
	st := handedState{Generation: r.status.Generation + 1, Upgrades: r.status.Upgrades, Totals: r.status.Totals, Tickets: p.tickets.state()}
	b, _ := json.Marshal(st)
	p.emit(Event{Kind: EventUpgradeStarted, Time: start, PID: os.Getpid(), Generation: r.status.Generation, Totals: r.status.Totals})
	r.mu.Unlock()
	return b
}

// maxRecordErr bounds an upgrade's error as the record keeps it: the
// record travels to each new process and into every status answer.
const maxRecordErr = 2 << 10

// shorten cuts s to at most n bytes (at a character's start), saying how
// much was left out.
func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%s… (%d more bytes)", s[:cut], len(s)-cut)
}

// endAttempt records the outcome of the attempt begun last.
func (p *Process) endAttempt(start time.Time, newPID int, err error) {
	r := p.record
	d := time.Since(start)
	r.mu.Lock()
	if r.attempt >= 0 {
		u := &r.status.Upgrades[r.attempt]
		u.Duration, u.NewPID = d, newPID
		switch {
		case errors.Is(err, ErrRolledBack):
			u.Outcome, u.Err = OutcomeRolledBack, shorten(err.Error(), maxRecordErr)
		case err != nil:
			u.Outcome, u.Err = OutcomeFailed, shorten(err.Error(), maxRecordErr)
		default:
			u.Outcome = OutcomeSucceeded
		}
	}
	r.attempt = -1
	switch {
	case errors.Is(err, ErrRolledBack):
		r.status.Totals.RolledBack++
	case err != nil:
		r.status.Totals.Failed++
	default:
		r.status.Totals.Succeeded++
	}
	e := Event{Kind: EventUpgradeSucceeded, Time: time.Now(), PID: os.Getpid(), Generation: r.status.Generation, NewPID: newPID, Duration: d, Err: err, Totals: r.status.Totals}
	if err != nil {
		e.Kind = EventUpgradeFailed
	}
	p.emit(e)
	r.mu.Unlock()
}

// attemptPID records the new process of the attempt in progress, once it
// is known (a probation learns it before the attempt ends).
func (p *Process) attemptPID(pid int) {
	r := p.record
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.attempt >= 0 {
		r.status.Upgrades[r.attempt].NewPID = pid
	}
}

// inherit takes the state our parent passed (see beginAttempt).
func (p *Process) inherit(body string) {
	var st handedState
	if err := json.Unmarshal([]byte(body), &st); err != nil || st.Generation < 2 {
		p.log.Warn("upgrade record from the previous process unreadable; starting a new one", "err", err)
		return
	}
	p.tickets.inherit(st.Tickets)
	r := p.record
	r.mu.Lock()
	defer r.mu.Unlock()
	r.status.Generation = st.Generation
	r.status.Upgrades = st.Upgrades
	r.status.Totals = st.Totals
	r.status.Totals.EventsDropped = 0 // ours are counted by our queue
}

// probationBegan tells the events that this process, a canary, serves its
// share: its own metrics (the generation) are scraped from now on.
func (p *Process) probationBegan() {
	st := p.Status()
	p.emit(Event{Kind: EventProbation, Time: time.Now(), PID: st.PID, Generation: st.Generation, Totals: st.Totals})
}

// declaredServing records that this process serves: after an upgrade, the
// attempt that started it succeeded.
func (p *Process) declaredServing() {
	r := p.record
	now := time.Now()
	r.mu.Lock()
	gen := r.status.Generation
	var up *Event
	if n := len(r.status.Upgrades); gen > 1 && n > 0 && r.status.Upgrades[n-1].Generation == gen && r.status.Upgrades[n-1].Outcome == OutcomeInProgress {
		u := &r.status.Upgrades[n-1]
		u.Outcome, u.NewPID, u.Duration = OutcomeSucceeded, os.Getpid(), now.Sub(u.Started)
		r.status.Totals.Succeeded++
		up = &Event{Kind: EventUpgradeSucceeded, Time: now, PID: u.OldPID, Generation: gen - 1, NewPID: u.NewPID, Duration: u.Duration}
	}
	totals := r.status.Totals
	r.serving = true
	pending := r.pending
	r.pending = nil
	// Queued under the lock (put never waits): a report that arrives now
	// comes after them.
	if up != nil {
		up.Totals = totals
		p.emit(*up)
	}
	p.emit(Event{Kind: EventServing, Time: now, PID: os.Getpid(), Generation: gen, Totals: totals})
	r.mu.Unlock()
	if pending != nil {
		p.drainFinished(*pending, true)
	}
}

// drainFinished records the end of a drain: ours, or our predecessor's,
// which it reported.
func (p *Process) drainFinished(rep drainReport, fromPredecessor bool) {
	r := p.record
	r.mu.Lock()
	if fromPredecessor && !r.serving {
		r.pending = &rep
		r.mu.Unlock()
		return
	}
	r.status.Totals.Drains++
	r.status.Totals.Drain.add(rep.Drain)
	if fromPredecessor {
		for i := len(r.status.Upgrades) - 1; i >= 0; i-- {
			// The upgrade that started us; the report may come before we
			// have marked it succeeded (we receive before we are ready).
			if u := &r.status.Upgrades[i]; u.OldPID == rep.PID && u.Generation == rep.Generation+1 {
				d := rep.Drain
				u.Drain = &d
				break
			}
		}
	}
	// Queued under the lock, so that events carry totals in order.
	p.emit(Event{Kind: EventDrainFinished, Time: time.Now(), PID: rep.PID, Generation: rep.Generation, Duration: rep.Drain.Duration, Drain: rep.Drain, Totals: r.status.Totals})
	r.mu.Unlock()
}

// generation returns this process's generation.
func (p *Process) generation() int {
	p.record.mu.Lock()
	defer p.record.mu.Unlock()
	return p.record.status.Generation
}

// controlMessage acts on a control message from the other end of a
// hand-off channel: from the parent, or from a new process on probation.
func (p *Process) controlMessage(msg string) {
	kind, body, _ := strings.Cut(msg, " ")
	switch kind {
	case drainRequest:
		p.askedOnce.Do(func() { close(p.parentAsked) })
	case drainedMessage:
		var rep drainReport
		if err := json.Unmarshal([]byte(body), &rep); err != nil {
			p.log.Warn("drain report from the previous process unreadable", "err", err)
			return
		}
		p.drainFinished(rep, true)
	case streamsMessage: // from a new process, read by a receive loop (probation)
		p.successorTakes(body)
	case helloMessage: // from a new process, read by a receive loop (probation)
		if pid, err := strconv.Atoi(body); err == nil {
			p.lastHello.Store(int64(pid))
		}
	case reportRequest, promoteMessage, revertMessage:
		p.canaryControl(kind, body)
	case candidateMessage, reportMessage, handedBackMessage, leavingMessage:
		p.trialControl(kind, body)
	}
}

// emit passes e to Options.OnEvent, without waiting for it; a no-op
// without OnEvent. It takes the queue's lock, after the record's if the
// caller holds that.
func (p *Process) emit(e Event) {
	if p.events != nil {
		p.events.put(e)
	}
}

// eventQueue delivers events to the hook in order, on its own goroutine:
// a slow hook delays only other events, never an upgrade or a drain. When
// maxQueuedEvents wait, new ones are dropped and counted.
type eventQueue struct {
	hook func(Event)

	mu      sync.Mutex
	queue   []Event
	dropped int  // since the last delivered event
	total   int  // dropped, ever
	running bool // a goroutine is delivering
	idle    *sync.Cond
}

// maxQueuedEvents bounds the events waiting for a slow hook.
const maxQueuedEvents = 1024

func newEventQueue(hook func(Event)) *eventQueue {
	q := &eventQueue{hook: hook}
	q.idle = sync.NewCond(&q.mu)
	return q
}

func (q *eventQueue) put(e Event) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.queue) >= maxQueuedEvents {
		q.dropped++
		q.total++
		return
	}
	e.Dropped, q.dropped = q.dropped, 0
	e.Totals.EventsDropped = q.total
	q.queue = append(q.queue, e)
	if !q.running {
		q.running = true
		go q.deliver()
	}
}

// deliver calls the hook for each queued event, then ends: a goroutine
// exists only while events wait.
func (q *eventQueue) deliver() {
	q.mu.Lock()
	for len(q.queue) > 0 {
		e := q.queue[0]
		q.queue = q.queue[1:]
		q.mu.Unlock()
		q.hook(e)
		q.mu.Lock()
	}
	q.running = false
	q.idle.Broadcast()
	q.mu.Unlock()
}

// flush waits until every queued event has been delivered, at most d.
func (q *eventQueue) flush(d time.Duration) bool {
	if q == nil {
		return true
	}
	timer := time.AfterFunc(d, func() {
		q.mu.Lock()
		q.idle.Broadcast()
		q.mu.Unlock()
	})
	defer timer.Stop()
	deadline := time.Now().Add(d)
	q.mu.Lock()
	defer q.mu.Unlock()
	for q.running && time.Now().Before(deadline) {
		q.idle.Wait()
	}
	return !q.running
}

func (q *eventQueue) droppedTotal() int {
	if q == nil {
		return 0
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.total
}
