package graceful

import (
	"context"
	"errors"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A pair registered while the drain begins (between marking the drain and
// calling the stops: the listeners are being closed) is started and
// stopped once, like every other; one registered after the group is over is
// ignored.
func TestGroupAddDuringBeginStop(t *testing.T) {
	g := newGroup(slog.New(slog.DiscardHandler))
	release := make(chan struct{})
	g.add(entry{run: func() error { <-release; return nil }, stop: func(context.Context) error { return nil }})
	g.start()
	lateStops := 0
	late := make(chan struct{})
	g.beginStop(context.Background(), func() {
		g.add(entry{run: func() error { <-late; return errors.New("late run ends") }, stop: func(context.Context) error {
			lateStops++ // serialised: there is one stop
			close(late)
			return nil
		}})
	})
	close(release)
	require.NoError(t, g.wait())
	assert.Equal(t, 1, lateStops, "stopped once")
	assert.NoError(t, g.failure(), "a run that returns during the drain is not a failure")
	g.add(entry{run: func() error { t.Error("ran after the group was over"); return nil }, stop: nil})
}

// A run that returns before the drain ends the group: its error is the
// failure, every stop is called, and stops' errors are joined.
func TestGroupRunFailure(t *testing.T) {
	g := newGroup(slog.New(slog.DiscardHandler))
	stopped := make(chan struct{})
	g.add(entry{run: func() error { return errors.New("port gone") }, stop: func(context.Context) error { return nil }})
	g.add(entry{run: func() error { <-stopped; return nil }, stop: func(context.Context) error {
		close(stopped)
		return errors.New("stop failed")
	}})
	g.start()
	<-g.exited
	g.beginStop(context.Background(), func() {})
	assert.EqualError(t, g.wait(), "stop failed")
	assert.EqualError(t, g.failure(), "port gone")
}
