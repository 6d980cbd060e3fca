package graceful

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"
)

// logUpgradeFailure says "still serving" only while it is true, and calls a
// refusal a refusal.
func TestLogUpgradeFailure(t *testing.T) {
	cases := []struct {
		phase Phase
		err   error
		want  string
	}{
		{PhaseServing, errors.New("child exited: exit status 3"), `level=ERROR msg="upgrade failed; still serving"`},
		{PhaseUpgrading, fmt.Errorf("wrapped: %w", ErrUpgradeInProgress), `level=WARN msg="upgrade refused"`},
		{PhaseServing, ErrNotReady, `level=WARN msg="upgrade refused"`},
		{PhaseDelaying, ErrDraining, `level=WARN msg="upgrade refused: the process is draining"`},
		{PhaseDraining, errors.New("graceful: upgrade: terminating"), `level=ERROR msg="upgrade abandoned: the process is draining"`},
		{PhaseDone, errors.New("graceful: upgrade: terminating"), `level=ERROR msg="upgrade abandoned: the process is draining"`},
	}
	for _, c := range cases {
		var buf bytes.Buffer
		p := &Process{life: newLifecycle(), log: slog.New(slog.NewTextHandler(&buf, nil))}
		p.life.phase.Store(int32(c.phase))
		p.logUpgradeFailure(c.err)
		assert.Contains(t, buf.String(), c.want, "%v in %v", c.err, c.phase)
		if !c.phase.ready() {
			assert.NotContains(t, buf.String(), "still serving", "%v in %v", c.err, c.phase)
		}
	}
}
