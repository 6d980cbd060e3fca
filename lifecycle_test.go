package graceful

import (
	"log/slog"
	"os"
	"syscall"
	"testing"
	"testing/synctest"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestPhaseTransitions checks the table: from every phase, exactly the
// transitions listed on Phase are allowed, and a refused one changes
// nothing.
func TestPhaseTransitions(t *testing.T) {
	allowed := map[[2]Phase]bool{}
	for from, tos := range phaseTransitions {
		for _, to := range tos {
			allowed[[2]Phase{Phase(from), to}] = true
		}
	}
	assert.Len(t, allowed, 19, "the table in lifecycle.go's comment has 19 transitions")
	for from := PhaseStarting; from <= PhaseDone; from++ {
		for to := PhaseStarting; to <= PhaseDone; to++ {
			l := newLifecycle()
			l.phase.Store(int32(from))
			got, ok := l.enter(to)
			assert.Equal(t, from, got)
			assert.Equal(t, allowed[[2]Phase{from, to}], ok, "%v -> %v", from, to)
			if ok {
				assert.Equal(t, to, l.get())
			} else {
				assert.Equal(t, from, l.get())
			}
		}
	}
	l := newLifecycle()
	assert.False(t, l.move(PhaseServing, PhaseUpgrading), "move checks the phase it starts from")
	assert.Equal(t, "handing-over", PhaseHandingOver.String())
	assert.Equal(t, "Phase(42)", Phase(42).String())
}

// The channels close as side effects of the transitions that name them,
// once, and in the order the drain needs: listeners closed (beforeDrain)
// and goodbyes started (onDrain) before Draining() closes.
func TestPhaseSideEffects(t *testing.T) {
	for _, upgrade := range []bool{false, true} {
		l := newLifecycle()
		var order []string
		l.beforeDrain = func() {
			assert.False(t, isClosed(l.draining), "draining is closed after beforeDrain")
			order = append(order, "beforeDrain")
		}
		l.onDrain = func() { order = append(order, "onDrain") }
		require.True(t, l.move(PhaseStarting, PhaseChecking))
		assert.False(t, isClosed(l.ready))
		require.True(t, l.move(PhaseChecking, PhaseServing))
		assert.True(t, isClosed(l.ready))
		require.True(t, l.move(PhaseServing, PhaseUpgrading))
		assert.True(t, PhaseUpgrading.ready(), "serving on while upgrading")
		if upgrade {
			require.True(t, l.move(PhaseUpgrading, PhaseHandingOver))
			assert.True(t, isClosed(l.upgraded))
		} else {
			require.True(t, l.move(PhaseUpgrading, PhaseServing), "a failed attempt")
			require.True(t, l.move(PhaseServing, PhaseDelaying))
			assert.False(t, isClosed(l.draining), "the delay serves on")
			require.True(t, l.move(PhaseDelaying, PhaseDraining))
			assert.False(t, isClosed(l.upgraded))
		}
		assert.True(t, isClosed(l.draining))
		assert.Equal(t, []string{"beforeDrain", "onDrain"}, order, "the drain begins once")
		_, ok := l.enter(PhaseDraining)
		assert.False(t, ok, "no second drain")
		require.True(t, l.move(l.get(), PhaseDone))
		assert.Equal(t, PhaseDone, l.get())
	}
}

// A drain requested while an attempt runs waits for its outcome, whatever
// it is, and says whether a new process became ready; one requested
// otherwise does not wait.
func TestSettleAttempt(t *testing.T) {
	newProcess := func(ph Phase) *Process {
		p := &Process{life: newLifecycle(), log: slog.New(slog.DiscardHandler), attemptEnded: make(chan struct{}, 1)}
		p.life.phase.Store(int32(ph))
		return p
	}
	drainSig := make(chan os.Signal, 1)
	assert.False(t, newProcess(PhaseServing).settleAttempt(drainSig), "no attempt: no wait")
	assert.False(t, newProcess(PhaseHandingOver).settleAttempt(drainSig), "an attempt that ended before the drain was asked")

	for _, outcome := range []Phase{PhaseServing, PhaseHandingOver} {
		synctest.Test(t, func(t *testing.T) {
			p := newProcess(PhaseUpgrading)
			drainSig := make(chan os.Signal, 1) // of the bubble: waits on it are durable
			got := make(chan bool, 1)
			go func() { got <- p.settleAttempt(drainSig) }()
			synctest.Wait() // it waits
			select {
			case <-got:
				t.Fatal("returned while the attempt runs")
			default:
			}
			// The attempt ends (refused by the previous generation,
			// failed, or done): every way out of Upgrading wakes the wait.
			require.True(t, p.life.move(PhaseUpgrading, outcome))
			if outcome == PhaseServing {
				p.attemptEnd()
			}
			assert.Equal(t, outcome == PhaseHandingOver, <-got, "outcome %v", outcome)
		})
	}

	synctest.Test(t, func(t *testing.T) {
		p := newProcess(PhaseUpgrading)
		drainSig := make(chan os.Signal, 1)
		got := make(chan bool, 1)
		go func() { got <- p.settleAttempt(drainSig) }()
		synctest.Wait()
		drainSig <- syscall.SIGTERM
		assert.False(t, <-got, "a second drain signal stops the wait")
		assert.Equal(t, PhaseUpgrading, p.life.get())
	})
}
