package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestStreamsAcrossUpgrades holds 50 SSE and 50 WebSocket clients through
// 20 upgrades with -goodbye-spread: every stream ends with its goodbye
// (event: reconnect, close 1012), none is cut, every client reconnects to
// the new process, and the goodbyes of one drain are spread out, not sent
// in the same instant.
func TestStreamsAcrossUpgrades(t *testing.T) {
	const (
		upgrades = 20
		streams  = 100
		spread   = 200 * time.Millisecond
	)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/httpserver", loadtest.Config{
		Args: []string{"-goodbye-spread", spread.String(), "-drain-timeout", "10s"}})

	load := loadtest.StartLoad(srv.Addr, loadtest.Mix{SSE: streams / 2, WS: streams / 2})
	waitStreams := func(pid int) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for load.StreamsOn(pid) < streams {
			if time.Now().After(deadline) {
				t.Fatalf("only %d of %d streams reconnected to pid %d", load.StreamsOn(pid), streams, pid)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitStreams(srv.PID())
	var spans []time.Duration
	for i := range upgrades {
		seen := len(load.Goodbyes())
		u, err := srv.Upgrade(ctx, 30*time.Second)
		require.NoError(t, err, "upgrade %d", i+1)
		assert.Equal(t, 0, u.ExitCode)
		waitStreams(u.NewPID)
		g := load.Goodbyes()[seen:]
		require.Len(t, g, streams, "upgrade %d: one goodbye per stream", i+1)
		spans = append(spans, g[len(g)-1].Sub(g[0]))
	}
	stats := load.Stop()
	var report strings.Builder
	stats.Report(&report)
	assert.Zero(t, stats.Failed(), report.String())
	assert.Equal(t, upgrades*streams, stats.StreamsGraceful, report.String())
	for i, s := range spans {
		assert.GreaterOrEqual(t, s, spread/2, "upgrade %d: goodbyes spread over %v", i+1, s)
	}
	t.Logf("goodbye spans per upgrade: %v", spans)
}
