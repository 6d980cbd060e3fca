package graceful

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"
)

// Upgrade starts the executable found on disk at this process's path as a
// child, passes it every listener, and blocks until the child is ready (nil),
// exits, or misses [Options.UpgradeTimeout] (an error naming the cause; the
// child is killed). On failure this process carries on serving unchanged. On
// success the process enters [PhaseHandingOver] and [Process.Run] drains
// and returns. Once a drain has been requested no attempt starts
// ([ErrDraining]). It returns at once [ErrUpgradeInProgress] while another attempt
// runs or the previous generation still drains, [ErrNotReady] before the
// process is ready, and [ErrDraining] once it is on its way out. ctx bounds
// only the wait: the attempt itself is bounded by UpgradeTimeout and still
// counts as in progress until it ends.
func (p *Process) Upgrade(ctx context.Context) error {
	// Counted before the phase moves, so that Run, which waits for every
	// attempt before it returns, cannot miss this one; and moved under the
	// same lock as a drain request, so that a drain either sees this
	// attempt (and waits for it) or refuses it.
	p.mu.Lock()
	if p.attemptsOver || p.drainAsked {
		p.mu.Unlock()
		return ErrDraining
	}
	p.attempts.Add(1)
	moved := p.life.move(PhaseServing, PhaseUpgrading)
	p.mu.Unlock()
	handedOver := false
	defer func() {
		if !handedOver {
			p.attempts.Done()
			p.attemptEnd()
		}
	}()
	if !moved {
		switch ph := p.life.get(); {
		case ph == PhaseUpgrading:
			return ErrUpgradeInProgress
		case ph.draining():
			return ErrDraining
		case ph == PhaseServing:
			return ErrUpgradeInProgress // another attempt just ended
		default:
			return ErrNotReady
		}
	}
	if err := p.waitPrevious(); err != nil {
		p.life.move(PhaseUpgrading, PhaseServing)
		return err
	}
	if p.life.get() != PhaseUpgrading {
		return ErrDraining // a drain began while we waited for the parent
	}
	start := time.Now()
	p.log.Info("upgrade starting")
	p.notify("RELOADING=1", monotonicUsec(), status("upgrading: starting a new process"))
	state := p.beginAttempt(start)
	result := make(chan error, 1)
	handedOver = true
	go func() {
		defer p.attempts.Done()
		tr := p.beginTrial(start) // nil without probation
		newPID, err := p.upgrade(state, tr != nil)
		if tr != nil {
			err = tr.end(err)
		}
		result <- p.finishUpgrade(start, newPID, err)
	}()
	select {
	case err := <-result:
		return err
	case <-ctx.Done():
		return fmt.Errorf("graceful: upgrade: stopped waiting: %w", ctx.Err())
	}
}

// finishUpgrade moves the lifecycle on after an attempt: to HandingOver on
// success, back to Serving on failure (unless a drain began meanwhile).
func (p *Process) finishUpgrade(start time.Time, newPID int, err error) error {
	defer p.attemptEnd()
	if err != nil {
		err = fmt.Errorf("graceful: upgrade: %w", err)
	}
	p.endAttempt(start, newPID, err)
	if err != nil {
		// A new process that wrote the PID file and then failed (or was
		// killed by our drain) is dead: the file names this process again
		// (before the phase moves back: no new attempt can start and write
		// it meanwhile), or, if this one is draining, nothing.
		stale := p.opts.PIDFile != "" && readPIDFile(p.opts.PIDFile) != os.Getpid()
		if stale {
			if werr := writePIDFile(p.opts.PIDFile); werr != nil {
				p.log.Error("restoring the PID file after a failed upgrade", "err", werr)
			}
		}
		serving := p.life.move(PhaseUpgrading, PhaseServing)
		if stale && !serving {
			removePIDFile(p.opts.PIDFile)
		}
		if serving && !p.drainIsAsked() {
			p.notify("READY=1", status("upgrade failed, still serving (pid %d): %v", os.Getpid(), err))
		}
		return err
	}
	if !p.life.move(PhaseUpgrading, PhaseHandingOver) && !p.life.move(PhaseDelaying, PhaseHandingOver) {
		// A drain without successor began as the child became ready: the
		// child serves, this process drains as it had started to.
		p.log.Warn("new process ready after the drain began; draining without hand-off")
		return nil
	}
	p.log.Info("upgrade done: new process ready", "took", time.Since(start).Round(time.Millisecond))
	// Before this process exits: a supervisor (or systemd) learns the new
	// main PID before it sees this one gone.
	if pid := cmp.Or(p.successorPID(), newPID); pid != 0 {
		p.notify("MAINPID="+strconv.Itoa(pid), "READY=1", status("upgraded to pid %d; pid %d draining", pid, os.Getpid()))
	}
	return nil
}

// attemptEnd wakes a drain waiting for the outcome of an attempt.
func (p *Process) attemptEnd() {
	select {
	case p.attemptEnded <- struct{}{}:
	default:
	}
}

// logUpgradeFailure logs why an upgrade did not happen, saying "still
// serving" only when it is true.
func (p *Process) logUpgradeFailure(err error) {
	switch ph := p.Phase(); {
	case errors.Is(err, ErrUpgradeInProgress), errors.Is(err, ErrNotReady):
		p.log.Warn("upgrade refused", "err", err, "phase", ph.String())
	case errors.Is(err, ErrDraining):
		p.log.Warn("upgrade refused: the process is draining", "err", err, "phase", ph.String())
	case ph.ready() && !p.drainIsAsked():
		p.log.Error("upgrade failed; still serving", "err", err)
	default:
		p.log.Error("upgrade abandoned: the process is draining", "err", err, "phase", ph.String())
	}
}

// drainIsAsked reports whether a drain was requested: an attempt that
// fails then leaves a process on its way out, not one serving on.
func (p *Process) drainIsAsked() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.drainAsked
}

// otherProcess names, for the log, where the drain passes connections.
func (p *Process) otherProcess() string {
	if p.life.get() == PhaseHandingBack {
		return "previous process"
	}
	return "new process"
}

// handOffTarget returns where the drain passes idle connections: the
// successor, or (a canary rolled back) the previous process; nil when they
// are closed instead.
func (p *Process) handOffTarget() *handoff {
	switch ph := p.life.get(); {
	case p.opts.NoHandOff && ph != PhaseHandingBack:
		return nil
	case ph == PhaseHandingOver && p.toSuccessor != nil:
		return p.toSuccessor
	case ph == PhaseHandingBack && p.fromParent != nil:
		return p.fromParent
	}
	return nil
}
