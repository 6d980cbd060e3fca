package graceful

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"reflect"
	"time"
)

// This file holds the drain of the whole process: what happens, in order,
// once the lifecycle enters HandingOver or Draining, and the goodbyes of
// long-lived streams. How each kind of server drains its connections is in
// serve_http.go and serve_conns.go.

// beginDrain runs as the lifecycle enters HandingOver or Draining, before
// the goodbyes and before Draining() closes. It starts the drain's deadline,
// stops accepting (so that a client told goodbye reconnects to the
// successor, or to nothing, never to this process again), and calls every
// server's stop. The stops start before the goodbyes, which gives gRPC's
// GracefulStop a head start to send GOAWAY; under Serve, streams on HTTP/2
// connections are told goodbye only once Shutdown has sent it (see
// Goodbye).
func (p *Process) beginDrain() {
	p.mu.Lock()
	deadline := time.Now().Add(p.opts.DrainTimeout)
	if !p.drainBy.IsZero() && p.drainBy.Before(deadline) {
		deadline = p.drainBy // a canary rolled back: before the old process gives up on it
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	p.drainCtx, p.drainCancel = ctx, cancel
	p.mu.Unlock()
	if p.takesBack() {
		p.inboxes.finish() // no canary can hand anything back any more
	}
	// Connections from the parent are received until it exits, or until
	// our drain ends: its deadline bounds our drain whatever the parent
	// does (a parent frozen mid-drain must not hold us).
	context.AfterFunc(ctx, p.fromParent.close)
	// Sends to the successor (or, from a canary, back to the parent) wait
	// for it until the deadline (see setDeadline).
	p.toSuccessor.setDeadline(deadline)
	p.fromParent.setDeadline(deadline)
	p.drainInFlight.Store(int64(p.inFlight())) // once per drain
	p.group.beginStop(ctx, p.closeListeners)
}

// drainContext returns the drain's context (done at its deadline), or nil
// before the drain.
func (p *Process) drainContext() context.Context {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.drainCtx
}

// drain stops every registered server within DrainTimeout. The lifecycle
// has entered HandingOver or Draining.
func (p *Process) drain(reason string) error {
	start := time.Now()
	<-p.life.draining // beginDrain has run
	upgraded := p.life.get() == PhaseHandingOver
	p.mu.Lock()
	cancel := p.drainCancel
	p.mu.Unlock()
	defer cancel()
	p.log.Info("draining", "reason", reason, "timeout", p.opts.DrainTimeout)
	if p.events != nil {
		st := p.Status()
		p.emit(Event{Kind: EventDrainStarted, Time: start, PID: st.PID, Generation: st.Generation, Reason: reason, Drain: DrainStats{InFlight: int(p.drainInFlight.Load())}, Totals: st.Totals})
	}
	// A canary rolled back never declared itself ready: the service, its
	// sockets and its PID file are the old process's, which serves on (or
	// drains itself).
	ready := isClosed(p.life.ready) && (p.canary == nil || isClosed(p.canary.open))
	if !upgraded && ready {
		p.notify("STOPPING=1", status("draining (pid %d)", os.Getpid()), extendTimeout(p.opts.DrainTimeout+drainMargin))
	}
	// Cancels an upgrade still in progress (its child is killed) and, with
	// no successor, removes the Unix socket files. Not in a new process that
	// never became ready: the sockets are its parent's, which serves on.
	if ready || !p.hasParent() {
		if tr := p.trial.Load(); tr != nil && tr.serving.Load() {
			// A canary on probation serves clients: it drains, on its own,
			// before an upgrade still in progress is cancelled.
			tr.abandon("the old process is draining", true)
			ctx := p.drainContext()
			select {
			case <-tr.ended:
			case <-ctx.Done():
			}
		}
		p.stopPlatform()
	}
	if !upgraded && p.opts.PIDFile != "" {
		removePIDFile(p.opts.PIDFile)
	}
	err := p.group.wait()
	if p.life.get() == PhaseHandingBack {
		// Every connection it could pass back is on its way, before this.
		if serr := p.fromParent.sendControl(handedBackMessage, time.Second); serr != nil {
			p.log.Warn("probation: cannot tell the previous process the hand-back is over", "err", serr)
		}
	}
	p.spreading.Wait() // bounded: spread says the rest at once when ctx ends
	p.log.Info("drained", "took", time.Since(start).Round(time.Millisecond))
	p.reportDrain(start, upgraded)
	if err != nil {
		return fmt.Errorf("graceful: drain: %w", err)
	}
	return nil
}

// reportDrain records the drain that began at start, and tells the
// successor, if any, how it went.
func (p *Process) reportDrain(start time.Time, upgraded bool) {
	rep := drainReport{PID: os.Getpid(), Generation: p.generation()}
	d := &rep.Drain
	d.Duration = time.Since(start)
	d.InFlight = int(p.drainInFlight.Load())
	d.Goodbyes = int(p.goodbyed.Load())
	p.mu.Lock()
	for _, t := range p.trackers {
		d.Handed += int(t.handed.Load())
		d.NotHanded += int(t.kept.Load())
		d.Retired += int(t.retired.Load())
		d.Expired += int(t.expired.Load())
		d.Forced += int(t.forced.Load())
	}
	p.mu.Unlock()
	p.drainFinished(rep, false)
	if upgraded && p.toSuccessor != nil {
		b, _ := json.Marshal(rep)
		p.toSuccessor.setDeadline(time.Now().Add(time.Second)) // past the drain's own deadline, maybe
		if err := p.toSuccessor.sendControl(drainedMessage+" "+string(b), 0); err != nil {
			p.log.Warn("cannot tell the new process how the drain went", "err", err)
		}
	}
}

// inFlight counts the requests being served: the connections with one in
// flight or hijacked (under Serve; an HTTP/2 connection with streams counts
// once) and those being handled (ServeConns). It reads the connection states the
// trackers keep anyway, so that serving costs nothing more with events.
func (p *Process) inFlight() int {
	n := 0
	for _, t := range p.trackerList() {
		t.mu.Lock()
		for c := range t.conns {
			if t.raw || c.http == http.StateActive || c.http == http.StateHijacked {
				n++
			}
		}
		t.mu.Unlock()
	}
	return n
}

// addTracker counts t's connections in the drain's figures.
func (p *Process) addTracker(t *tracker) {
	p.mu.Lock()
	p.trackers = append(p.trackers, t)
	p.mu.Unlock()
}

// drainRequested prepares the drain that a drain signal, ctx or the parent
// asked for. While an upgrade attempt runs, it first waits for the
// outcome: the new process may already be accepting, and killing it would
// drop what it accepted and leave the PID file naming a dead process. If
// the new process became ready, this one drains into it, and the new one is
// asked to drain too, so that the service stops as asked, losing nothing.
// Otherwise the drain goes on as usual (DrainDelay first).
func (p *Process) drainRequested(drainSig <-chan os.Signal) {
	p.mu.Lock()
	p.drainAsked = true // no attempt starts from now on (see Upgrade)
	p.mu.Unlock()
	if tr := p.trial.Load(); tr != nil {
		// A canary serves clients: it drains too, instead of waiting for
		// its verdict or being killed.
		tr.abandon("the old process was told to stop", true)
	}
	if p.settleAttempt(drainSig) {
		if err := p.toSuccessor.requestDrain(); err != nil {
			p.log.Error("cannot ask the new process to drain; signalling it", "err", err)
			p.signalSuccessor()
		}
		return
	}
	p.delayDrain(drainSig)
}

// settleAttempt waits, if an upgrade attempt runs when the drain is
// requested, for its outcome (bounded by UpgradeTimeout, plus the wait for
// the previous generation), and reports whether that attempt made a new
// process ready. A second drain signal stops the wait: the drain then
// cancels the attempt.
func (p *Process) settleAttempt(drainSig <-chan os.Signal) bool {
	if p.life.get() != PhaseUpgrading {
		return false
	}
	p.log.Info("drain requested during an upgrade: waiting for its outcome")
	for p.life.get() == PhaseUpgrading {
		select {
		case <-p.life.upgraded:
		case <-p.attemptEnded:
		case sig := <-drainSig:
			p.log.Info("second drain signal: cancelling the upgrade", "signal", sig.String())
			return false
		}
	}
	return p.life.get() == PhaseHandingOver
}

// delayDrain enters Delaying for DrainDelay: readiness fails while the
// process keeps serving, so that load balancers stop sending traffic before
// the listener closes. A second drain signal, a successful upgrade or a
// server stopping ends it early.
func (p *Process) delayDrain(drainSig <-chan os.Signal) {
	if p.opts.DrainDelay <= 0 {
		return
	}
	if _, ok := p.life.enter(PhaseDelaying); !ok {
		return
	}
	p.log.Info("readiness failing; serving on before the drain", "delay", p.opts.DrainDelay)
	p.notify("STOPPING=1", status("readiness failing, draining in %v", p.opts.DrainDelay),
		extendTimeout(p.opts.DrainDelay+p.opts.DrainTimeout+drainMargin))
	t := time.NewTimer(p.opts.DrainDelay)
	defer t.Stop()
	select {
	case <-t.C:
	case sig := <-drainSig:
		p.log.Info("second drain signal: draining now", "signal", sig.String())
	case <-p.life.upgraded:
	case <-p.group.exited:
	}
}

// Goodbye returns a channel closed when the long-lived stream (SSE,
// WebSocket, gRPC stream) served under ctx should end with a goodbye in its
// own protocol. With [Options.GoodbyeSpread] zero, every stream is told as
// the drain starts (it is [Process.Draining], unless [Options.OnEvent],
// which counts the goodbyes, is set). Otherwise the streams open when the
// drain starts are told one at a time,
// evenly over GoodbyeSpread and in random order, so that their clients do
// not all reconnect to the new process in the same instant; a stream that
// asks once the drain has started is told at once. A stream on an HTTP/2
// connection of a [Process.Serve] server is told no earlier than its
// connection's GOAWAY, so that its client reconnects elsewhere instead of
// on the same connection. Calls with the same ctx return the same channel;
// the registration ends with ctx. A nil *Process returns a nil channel.
func (p *Process) Goodbye(ctx context.Context) <-chan struct{} {
	if p == nil {
		return nil
	}
	gate := goodbyeGate(ctx) // HTTP/2 under Serve: not before the GOAWAY
	if p.opts.GoodbyeSpread <= 0 && p.events == nil {
		if gate != nil {
			return gate.Done() // done after the drain began, at Shutdown
		}
		return p.life.draining
	}
	if !reflect.TypeOf(ctx).Comparable() { // no map key: a registration per call
		g := make(chan struct{})
		p.onGoodbye(ctx, goodbyeFunc(gate, g), true)
		return g
	}
	// One registration per stream, however often it asks.
	p.mu.Lock()
	g, ok := p.goodbyeOf[ctx]
	if !ok {
		g = make(chan struct{})
		p.goodbyeOf[ctx] = g
	}
	p.mu.Unlock()
	if ok {
		return g
	}
	context.AfterFunc(ctx, func() {
		p.mu.Lock()
		delete(p.goodbyeOf, ctx)
		p.mu.Unlock()
	})
	p.onGoodbye(ctx, goodbyeFunc(gate, g), true)
	return g
}

// goodbyeFunc closes g, once gate (if any) is done.
func goodbyeFunc(gate context.Context, g chan struct{}) func() {
	if gate == nil {
		return func() { close(g) }
	}
	return func() { context.AfterFunc(gate, func() { close(g) }) }
}

// onGoodbye registers f to be called once, in the goodbye spreading, when
// the stream served under ctx should say goodbye; at once if the drain has
// already started. The registration ends with ctx. counted says whether it
// counts in the drain's figures (not the control socket's connections).
func (p *Process) onGoodbye(ctx context.Context, f func(), counted bool) {
	p.mu.Lock()
	if p.goodbyeAt {
		p.mu.Unlock()
		if counted {
			p.goodbyed.Add(1)
		}
		f()
		return
	}
	key := &f
	p.goodbyes[key] = counted
	p.mu.Unlock()
	context.AfterFunc(ctx, func() {
		p.mu.Lock()
		delete(p.goodbyes, key)
		p.mu.Unlock()
	})
}

// spreadGoodbyes runs as the lifecycle enters HandingOver or Draining: it
// says every registered goodbye, spread over GoodbyeSpread.
func (p *Process) spreadGoodbyes() {
	p.mu.Lock()
	p.goodbyeAt = true
	list := make([]func(), 0, len(p.goodbyes))
	counted := 0
	for f, c := range p.goodbyes {
		list = append(list, *f)
		if c {
			counted++
		}
	}
	p.goodbyes = nil
	ctx := p.drainCtx
	p.mu.Unlock()
	p.goodbyed.Add(int64(counted))
	p.spreading.Add(1)
	go func() {
		defer p.spreading.Done()
		spread(ctx, p.opts.GoodbyeSpread, list)
	}()
}

// spread calls every f in random order, evenly over d; once ctx ends, the
// rest at once.
func spread(ctx context.Context, d time.Duration, fs []func()) {
	rand.Shuffle(len(fs), func(i, j int) { fs[i], fs[j] = fs[j], fs[i] })
	start := time.Now()
	t := time.NewTimer(d)
	defer t.Stop()
	for i, f := range fs {
		if wait := time.Until(start.Add(d * time.Duration(i) / time.Duration(len(fs)))); wait > 0 && ctx.Err() == nil {
			t.Reset(wait)
			select {
			case <-t.C:
			case <-ctx.Done():
			}
		}
		f()
	}
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
