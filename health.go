package graceful

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultCheckTimeout bounds each health check call.
const DefaultCheckTimeout = 2 * time.Second

// Health holds the readiness state of a [Process] and serves probes.
// Readiness is: declared ready, every check passes, and not draining. Once
// draining starts readiness stays false.
type Health struct {
	ready    atomic.Bool
	draining atomic.Bool

	mu     sync.Mutex
	checks []namedCheck
}

type namedCheck struct {
	name string
	fn   func(context.Context) error
}

func newHealth() *Health { return &Health{} }

// AddCheck registers a named dependency check. Checks gate the first
// readiness of the process (a new process is not declared ready, so the old
// one keeps serving, until they all pass) and are run by the readiness probe.
// Each call is bounded by [DefaultCheckTimeout].
func (h *Health) AddCheck(name string, check func(ctx context.Context) error) {
	if check == nil {
		panic("graceful: AddCheck with nil check")
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.checks = append(h.checks, namedCheck{name: name, fn: check})
}

func (h *Health) setReady()    { h.ready.Store(true) }
func (h *Health) setDraining() { h.draining.Store(true) }

// runChecks runs every check concurrently and returns their failures.
func (h *Health) runChecks(ctx context.Context) error {
	h.mu.Lock()
	checks := append([]namedCheck(nil), h.checks...)
	h.mu.Unlock()
	errs := make([]error, len(checks))
	var wg sync.WaitGroup
	for i, c := range checks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, DefaultCheckTimeout)
			defer cancel()
			if err := c.fn(cctx); err != nil {
				errs[i] = fmt.Errorf("check %q: %w", c.name, err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// waitPass runs the checks until they all pass, ctx ends or timeout passes.
func (h *Health) waitPass(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	backoff := 50 * time.Millisecond
	for {
		err := h.runChecks(ctx)
		if err == nil {
			return nil
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		backoff = min(2*backoff, time.Second)
	}
}

// Liveness returns a handler that answers 200 "ok" while the process runs.
func (h *Health) Liveness() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeProbe(w, http.StatusOK, "ok")
	})
}

// Readiness returns a handler that answers 200 "ok" when the process is
// ready, and 503 with the reason otherwise.
func (h *Health) Readiness() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case h.draining.Load():
			writeProbe(w, http.StatusServiceUnavailable, "draining")
		case !h.ready.Load():
			writeProbe(w, http.StatusServiceUnavailable, "not ready")
		default:
			if err := h.runChecks(r.Context()); err != nil {
				writeProbe(w, http.StatusServiceUnavailable, err.Error())
				return
			}
			writeProbe(w, http.StatusOK, "ok")
		}
	})
}

func writeProbe(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	fmt.Fprintln(w, msg)
}
