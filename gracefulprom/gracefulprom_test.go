package gracefulprom_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/gracefulprom"
)

// The counters are the totals the events carry (so they go on across
// generations); the histograms count what this process observed.
func TestMetrics(t *testing.T) {
	m := gracefulprom.New()
	totals := graceful.Totals{Succeeded: 4, Failed: 1, Drains: 4, Drain: graceful.DrainStats{Handed: 30, Retired: 2, Forced: 1, Goodbyes: 5}}
	m.Observe(graceful.Event{Kind: graceful.EventUpgradeSucceeded, Duration: 40 * time.Millisecond, Totals: totals})
	m.Observe(graceful.Event{Kind: graceful.EventServing, Generation: 5, Totals: totals})
	drain := graceful.DrainStats{Duration: 300 * time.Millisecond, InFlight: 7, Handed: 10}
	totals.Drains++
	totals.Drain.Handed += 10
	m.Observe(graceful.Event{Kind: graceful.EventDrainFinished, Duration: drain.Duration, Drain: drain, Totals: totals, Dropped: 2})
	totals.Failed++
	m.Observe(graceful.Event{Kind: graceful.EventUpgradeFailed, Duration: 2 * time.Second, Err: errors.New("exit status 3"), Totals: totals})

	want := `
# HELP graceful_drain_connections_total Connections of finished drains by fate: handed to the new process, not handed (closed instead), retired idle, expired (request did not arrive in time), forced closed at the deadline.
# TYPE graceful_drain_connections_total counter
graceful_drain_connections_total{fate="expired"} 0
graceful_drain_connections_total{fate="forced"} 1
graceful_drain_connections_total{fate="handed"} 40
graceful_drain_connections_total{fate="not_handed"} 0
graceful_drain_connections_total{fate="retired"} 2
# HELP graceful_drain_in_flight Requests in flight when the last drain began.
# TYPE graceful_drain_in_flight gauge
graceful_drain_in_flight 7
# HELP graceful_drains_total Drains that finished, since the first generation started.
# TYPE graceful_drains_total counter
graceful_drains_total 5
# HELP graceful_events_dropped_total Events not delivered to Observe because it fell behind.
# TYPE graceful_events_dropped_total counter
graceful_events_dropped_total 2
# HELP graceful_generation Generation of the serving process: 1 for a process started cold, one more at each upgrade.
# TYPE graceful_generation gauge
graceful_generation 5
# HELP graceful_upgrades_total Upgrades by outcome, since the first generation started.
# TYPE graceful_upgrades_total counter
graceful_upgrades_total{outcome="failed"} 2
graceful_upgrades_total{outcome="rolled-back"} 0
graceful_upgrades_total{outcome="succeeded"} 4
`
	require.NoError(t, testutil.CollectAndCompare(m, strings.NewReader(want),
		"graceful_drain_connections_total", "graceful_drain_in_flight", "graceful_drains_total", "graceful_events_dropped_total", "graceful_generation", "graceful_upgrades_total"))
	require.Equal(t, 2, testutil.CollectAndCount(m, "graceful_upgrade_duration_seconds"), "one series per outcome")
	require.Equal(t, 1, testutil.CollectAndCount(m, "graceful_drain_duration_seconds"))
	lint, err := testutil.CollectAndLint(m)
	require.NoError(t, err)
	require.Empty(t, lint, "metric names and help follow Prometheus conventions")
}
