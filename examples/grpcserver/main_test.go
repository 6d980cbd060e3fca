package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// TestUpgradesWithGRPCClient drives the server with a real grpc-go client
// through upgrades: unary calls never fail (a draining process answers
// NOT_SERVING, which is a successful call), and Watch streams end with
// their goodbye (Unavailable "server restarting") and reopen on the new
// process.
func TestUpgradesWithGRPCClient(t *testing.T) {
	const callers, watchers, upgrades = 4, 4, 5
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := loadtest.StartPackage(t, "github.com/graceful-go/graceful/examples/grpcserver", loadtest.Config{NoHTTP: true,
		Args: []string{"-goodbye-spread", "100ms", "-drain-timeout", "10s"}})

	conn, err := grpc.NewClient(srv.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)

	var (
		mu       sync.Mutex
		failures []string
		calls    = map[int]int{} // unary calls answered per PID
		streams  = map[int]int{} // Watch streams opened per PID
		goodbyes = map[int]int{} // Watch streams ended by a goodbye per PID
		draining atomic.Int64
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		if len(failures) < 20 {
			failures = append(failures, fmt.Sprintf(format, args...))
		}
	}
	count := func(m map[int]int, md metadata.MD) {
		pid, _ := strconv.Atoi(strings.Join(md.Get("x-pid"), ""))
		mu.Lock()
		m[pid]++
		mu.Unlock()
	}
	loadCtx, stopLoad := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for loadCtx.Err() == nil {
				var md metadata.MD
				cctx, ccancel := context.WithTimeout(loadCtx, 5*time.Second)
				resp, err := client.Check(cctx, &healthpb.HealthCheckRequest{}, grpc.Header(&md))
				ccancel()
				switch {
				case loadCtx.Err() != nil:
				case err != nil:
					fail("Check: %v", err)
				case resp.Status == healthpb.HealthCheckResponse_NOT_SERVING:
					// Answered by a draining process before its GOAWAY
					// reached us: the truth, and not a failed call.
					draining.Add(1)
				default:
					count(calls, md)
				}
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	for range watchers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for loadCtx.Err() == nil {
				stream, err := client.Watch(loadCtx, &healthpb.HealthCheckRequest{})
				if err != nil {
					if loadCtx.Err() == nil {
						fail("Watch: %v", err)
					}
					return
				}
				md, err := stream.Header()
				if err == nil {
					count(streams, md)
				}
				for err == nil {
					_, err = stream.Recv()
				}
				switch st, _ := status.FromError(err); {
				case loadCtx.Err() != nil:
					return
				case st.Code() == codes.Unavailable && strings.Contains(st.Message(), "server restarting"):
					count(goodbyes, md)
				case errors.Is(err, context.Canceled):
					return
				default:
					fail("Watch ended without goodbye: %v", err)
					return
				}
			}
		}()
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	servedBy := func(pid int) func() bool {
		return func() bool {
			mu.Lock()
			defer mu.Unlock()
			return calls[pid] >= 50 && streams[pid] >= watchers
		}
	}
	waitFor("first process serving", servedBy(srv.PID()))
	first := srv.PID()
	var upgraded []int
	for i := range upgrades {
		u, err := srv.Upgrade(ctx, 30*time.Second)
		require.NoError(t, err, "upgrade %d", i+1)
		assert.Equal(t, 0, u.ExitCode)
		upgraded = append(upgraded, u.NewPID)
		waitFor(fmt.Sprintf("calls and streams on pid %d", u.NewPID), servedBy(u.NewPID))
	}
	stopLoad()
	wg.Wait()
	assert.Empty(t, failures)
	// Every stream a process served ended with its goodbye when it drained,
	// once. (A client that retries on its old HTTP/2 connection before the
	// GOAWAY reaches it may open one more stream on the draining process,
	// which is told goodbye at once: counted on that process too.)
	pids := append([]int{first}, upgraded...)
	for _, pid := range pids[:len(pids)-1] {
		assert.GreaterOrEqual(t, streams[pid], watchers, "pid %d served every watcher", pid)
		assert.Equal(t, streams[pid], goodbyes[pid], "pid %d: one goodbye per stream it served", pid)
	}
	assert.Zero(t, goodbyes[pids[len(pids)-1]], "the serving process told nobody goodbye")
	t.Logf("unary calls per pid: %v (plus %d answered NOT_SERVING while draining); streams per pid: %v", calls, draining.Load(), streams)
}
