package graceful

import (
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A hook that blocks delays only later events: put never waits, events
// arrive in order, and past maxQueuedEvents new ones are dropped, counted,
// and reported on the next one delivered.
func TestEventQueue(t *testing.T) {
	release, entered := make(chan struct{}), make(chan struct{}, 1)
	got := make(chan Event, 2*maxQueuedEvents)
	q := newEventQueue(func(e Event) {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-release
		got <- e
	})
	const extra = 7
	done := make(chan struct{})
	go func() {
		defer close(done)
		q.put(Event{PID: 0})
		<-entered // the hook holds event 0: the queue is empty again
		for i := 1; i < maxQueuedEvents+1+extra; i++ {
			q.put(Event{PID: i})
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("put waited for the hook")
	}
	assert.False(t, q.flush(10*time.Millisecond), "flush gives up on a blocked hook")
	assert.Equal(t, extra, q.droppedTotal())
	close(release)
	require.True(t, q.flush(10*time.Second))
	q.put(Event{PID: -1})
	require.True(t, q.flush(10*time.Second))
	close(got)
	var pids []int
	var last Event
	for e := range got {
		pids = append(pids, e.PID)
		last = e
	}
	require.Len(t, pids, maxQueuedEvents+1+1)
	for i := range maxQueuedEvents + 1 {
		require.Equal(t, i, pids[i], "in order")
	}
	assert.Equal(t, -1, last.PID)
	assert.Equal(t, extra, last.Dropped, "the next event says how many were dropped before it")

	var none *eventQueue
	assert.True(t, none.flush(time.Second))
	assert.Zero(t, none.droppedTotal())
}

func TestStatusJSON(t *testing.T) {
	s := Status{PID: 7, Generation: 3, Phase: PhaseHandingOver, Upgrades: []UpgradeRecord{{Outcome: OutcomeFailed, Err: "boom", Drain: &DrainStats{Handed: 2}}}}
	b, err := json.Marshal(s)
	require.NoError(t, err)
	assert.Contains(t, string(b), `"phase":"handing-over"`)
	var back Status
	require.NoError(t, json.Unmarshal(b, &back))
	assert.Equal(t, s, back)
	assert.Error(t, json.Unmarshal([]byte(`{"phase":"sleeping"}`), &back), "an unknown phase")

	assert.Equal(t, "v2", buildName("v2"))
	assert.NotEmpty(t, buildName(""))
}

// The record keeps the last maxHistory upgrades, and the attempt in
// progress stays the one endAttempt completes.
func TestRecordHistory(t *testing.T) {
	p := &Process{record: newRecord("test"), life: newLifecycle(), log: slog.New(slog.DiscardHandler)}
	for i := range maxHistory + 3 {
		start := time.Now()
		state := p.beginAttempt(start)
		var st handedState
		require.NoError(t, json.Unmarshal(state, &st))
		assert.Equal(t, 2, st.Generation, "a failed attempt does not advance the generation")
		assert.Equal(t, OutcomeInProgress, st.Upgrades[len(st.Upgrades)-1].Outcome, "the new process gets the attempt that starts it last")
		var err error
		if i%2 == 0 {
			err = assert.AnError
		}
		if err == nil {
			p.endAttempt(start, 100+i, nil)
		} else {
			p.endAttempt(start, 0, err)
		}
	}
	st := p.Status()
	require.Len(t, st.Upgrades, maxHistory)
	last := st.Upgrades[maxHistory-1]
	assert.Equal(t, OutcomeFailed, last.Outcome)
	assert.Equal(t, assert.AnError.Error(), last.Err)
	assert.Equal(t, OutcomeSucceeded, st.Upgrades[maxHistory-2].Outcome)
	assert.Equal(t, 100+maxHistory+1, st.Upgrades[maxHistory-2].NewPID)
	assert.Equal(t, 7, st.Totals.Failed)
	assert.Equal(t, 6, st.Totals.Succeeded)

	// An error of any size is kept within maxRecordErr (it travels to
	// every new process, and into every status answer).
	start := time.Now()
	p.beginAttempt(start)
	p.endAttempt(start, 0, errors.New(strings.Repeat("é", 3000)))
	st = p.Status()
	long := st.Upgrades[len(st.Upgrades)-1].Err
	assert.LessOrEqual(t, len(long), maxRecordErr+30)
	assert.True(t, utf8.ValidString(long), "cut at a character's start")
	assert.True(t, strings.HasSuffix(long, "… (3952 more bytes)"), "%q", long[len(long)-40:])
}
