package graceful

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"
)

// Defaults for the health checks' zero [Options] fields.
const (
	DefaultCheckTimeout = 2 * time.Second
	DefaultCheckCache   = time.Second
)

// Health holds the readiness state of a [Process] and serves probes.
// Readiness is: the process is in [PhaseServing], [PhaseUpgrading] or
// [PhaseProbation] (a canary serves real traffic), and
// every check passes. Once the drain is on its way ([PhaseDelaying] or
// later) readiness stays false.
type Health struct {
	life     *lifecycle
	timeout  time.Duration
	cacheFor time.Duration

	mu     sync.Mutex
	checks []*namedCheck
}

type namedCheck struct {
	name string
	fn   func(context.Context) error

	mu  sync.Mutex // one run at a time; waiting probes share its result
	at  time.Time
	err error
}

func newHealth(life *lifecycle, timeout, cacheFor time.Duration) *Health {
	return &Health{life: life, timeout: timeout, cacheFor: cacheFor}
}

// AddCheck registers a named dependency check. Checks gate the first
// readiness of the process (a new process is not declared ready, so the old
// one keeps serving, until they all pass) and are run by the readiness
// probe. Each call is bounded by [Options.CheckTimeout]; probes reuse a
// result for [Options.CheckCache] so they cannot overload a dependency.
func (h *Health) AddCheck(name string, check func(ctx context.Context) error) {
	if check == nil {
		panic("graceful: AddCheck with nil check")
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.checks = append(h.checks, &namedCheck{name: name, fn: check})
}

// checkResult is one check's outcome for a probe.
type checkResult struct {
	name string
	err  error
}

// runChecks runs every check concurrently; with cached, a result younger
// than the cache interval is reused.
func (h *Health) runChecks(ctx context.Context, cached bool) []checkResult {
	h.mu.Lock()
	checks := append([]*namedCheck(nil), h.checks...)
	h.mu.Unlock()
	res := make([]checkResult, len(checks))
	var wg sync.WaitGroup
	for i, c := range checks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i] = checkResult{c.name, h.run(ctx, c, cached)}
		}()
	}
	wg.Wait()
	return res
}

func (h *Health) run(ctx context.Context, c *namedCheck, cached bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cached && !c.at.IsZero() && time.Since(c.at) < h.cacheFor {
		return c.err
	}
	cctx, cancel := context.WithTimeout(ctx, h.timeout)
	defer cancel()
	err := c.fn(cctx)
	if err != nil && cctx.Err() != nil && ctx.Err() == nil {
		err = fmt.Errorf("timed out after %v: %w", h.timeout, err)
	}
	if ctx.Err() == nil { // a probe that gave up says nothing of the dependency
		c.at, c.err = time.Now(), err
	}
	return err
}

func joinFailures(res []checkResult) error {
	var errs []error
	for _, r := range res {
		if r.err != nil {
			errs = append(errs, fmt.Errorf("check %q: %w", r.name, r.err))
		}
	}
	return errors.Join(errs...)
}

// waitPass runs the checks until they all pass, ctx ends or timeout passes.
func (h *Health) waitPass(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	backoff := 50 * time.Millisecond
	for {
		err := joinFailures(h.runChecks(ctx, false))
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

// Liveness returns a handler that answers 200 "ok" while the process can
// serve at all. With ?verbose it lists what it checked.
func (h *Health) Liveness() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeProbe(w, r, "livez", []checkResult{{name: "ping"}})
	})
}

// Readiness returns a handler that answers 200 "ok" when the process is
// ready, and 503 with the reason otherwise. With ?verbose it lists each
// condition and check, Kubernetes style ("[+]name ok", "[-]name failed:
// reason").
func (h *Health) Readiness() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		res := []checkResult{{name: "started"}, {name: "draining"}}
		switch ph := h.life.get(); {
		case ph.draining():
			res[1].err = errors.New("process is draining")
		case !ph.ready():
			res[0].err = errors.New("not ready yet")
		}
		if res[0].err == nil && res[1].err == nil {
			for _, c := range h.runChecks(r.Context(), true) {
				c.name = "check:" + c.name
				res = append(res, c)
			}
		}
		writeProbe(w, r, "readyz", res)
	})
}

func writeProbe(w http.ResponseWriter, r *http.Request, probe string, res []checkResult) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	var failed error
	for _, c := range res {
		if c.err != nil {
			failed = fmt.Errorf("%s: %w", c.name, c.err)
			break
		}
	}
	code := http.StatusOK
	if failed != nil {
		code = http.StatusServiceUnavailable
	}
	w.WriteHeader(code)
	if _, verbose := r.URL.Query()["verbose"]; !verbose {
		if failed != nil {
			fmt.Fprintln(w, failed)
		} else {
			fmt.Fprintln(w, "ok")
		}
		return
	}
	for _, c := range res {
		if c.err != nil {
			fmt.Fprintf(w, "[-]%s failed: %v\n", c.name, c.err)
		} else {
			fmt.Fprintf(w, "[+]%s ok\n", c.name)
		}
	}
	if failed != nil {
		fmt.Fprintf(w, "%s check failed\n", probe)
	} else {
		fmt.Fprintf(w, "%s check passed\n", probe)
	}
}
