package graceful

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"
)

// ServeConns registers a raw stream server (TCP or Unix): when
// [Process.Run] starts, each connection accepted on ln is tracked and
// handled by handle in its own goroutine; the connection is closed when
// handle returns. ctx is done when the connection should say goodbye in its
// protocol: when the process drains (ln has stopped accepting by then),
// spread over [Options.GoodbyeSpread] like [Process.Goodbye]. A typical
// handle finishes the message it is reading (for example by setting a read
// deadline with [context.AfterFunc]), then passes the connection to the new
// process with [Process.HandOff] or sends its protocol's goodbye, and
// returns. Handlers have until [Options.DrainTimeout] to return; then their
// connections are closed. [FromContext] on ctx returns p.
func (p *Process) ServeConns(ln net.Listener, handle func(ctx context.Context, c net.Conn)) {
	if handle == nil {
		panic("graceful: ServeConns with nil handle")
	}
	p.serveConns(ln, handle, false)
}

// serveConns is ServeConns; an internal server (the control socket) is
// left out of the drain's figures.
func (p *Process) serveConns(ln net.Listener, handle func(ctx context.Context, c net.Conn), internal bool) {
	t := newTracker(ln.Addr().String())
	t.raw = true
	if !internal {
		p.addTracker(t)
	}
	s := &connServer{p: p, ln: &trackedListener{Listener: ln, t: t}, t: t, handle: handle, stopping: make(chan struct{}), internal: internal}
	p.addListener(ln, s.ln)
	// Connections the parent hands over with HandOff.
	if s.inbox, s.inboxLn = p.registerInbox(ln, t); s.inbox != nil {
		s.received = make(chan struct{})
	}
	p.Add(s.run, s.stop)
}

// HandOff passes c, a connection accepted by a [Process.ServeConns]
// listener, to the new process after a successful upgrade, typically once
// the handler's ctx is done, at a message boundary: nothing of the next
// message may have been read from c yet (bytes the peer sent stay in the
// socket and reach the new process). On success the new process's handler
// gets c as a new connection, and the caller must return from its handler
// without using c again. It fails, and c stays the caller's, when there is
// no successor to take it (no upgrade, [Options.NoHandOff], a platform
// without descriptor passing) or sending fails.
func (p *Process) HandOff(c net.Conn) error {
	tc, ok := c.(*trackedConn)
	if !ok || !tc.t.raw || tc.t == p.streams.t {
		return errors.New("graceful: HandOff: not a connection from ServeConns")
	}
	to := p.handOffTarget()
	if to == nil {
		return errors.New("graceful: HandOff: no new process to hand the connection to")
	}
	if !tc.beginHandOff() {
		return fmt.Errorf("graceful: HandOff: connection already %v", tc.state())
	}
	err := to.send(tc.t.key, tc.Conn)
	if err != nil {
		tc.to(connHanding, connSeen)
	} else {
		tc.to(connHanding, connHanded)
		tc.t.handed.Add(1)
	}
	close(tc.handDone)
	if err != nil {
		return fmt.Errorf("graceful: HandOff: %w", err)
	}
	return nil
}

type connServer struct {
	p      *Process
	ln     *trackedListener
	t      *tracker
	handle func(context.Context, net.Conn)

	handlers sync.WaitGroup // every handler
	stopping chan struct{}  // closed by stop
	stopOnce sync.Once
	inbox    *inbox           // connections handed over by the parent
	inboxLn  *trackedListener // inbox, tracked
	received chan struct{}    // closed when inbox is done accepting
	internal bool             // the control socket: not in the drain's figures
}

func (s *connServer) run() error {
	if s.inbox != nil {
		go func() {
			defer close(s.received)
			defer close(s.inbox.stopped)
			s.accept(s.inboxLn) // ends once the parent is gone
		}()
		defer func() { <-s.received }()
	}
	return s.accept(s.ln)
}

func (s *connServer) accept(ln *trackedListener) error {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ln.closed.Load() || errors.Is(err, net.ErrClosed) && ln == s.inboxLn {
				return nil
			}
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() && !errors.Is(err, syscall.EMFILE) && !errors.Is(err, syscall.ENFILE) && !errors.Is(err, syscall.ECONNABORTED) {
				return err
			}
			// Out of descriptors and the like: back off, as net/http does,
			// rather than end the server.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.p.log.Warn("accept failed; retrying", "addr", ln.Addr().String(), "err", err, "retry_in", delay)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-s.stopping:
				t.Stop()
			}
			continue
		}
		delay = 0
		ctx, cancel := context.WithCancel(context.WithValue(context.Background(), ctxKey{}, s.p))
		// Said in the goodbye spreading, or at once during our own drain
		// (a connection our parent handed over late).
		s.p.onGoodbye(ctx, cancel, !s.internal)
		s.handlers.Add(1)
		go func() {
			defer s.handlers.Done()
			defer cancel()
			defer c.Close()
			s.handle(ctx, c)
		}()
	}
}

func (s *connServer) stop(ctx context.Context) error {
	s.stopOnce.Do(func() { close(s.stopping) })
	s.ln.Close()
	defer func() {
		if n := s.t.handed.Load(); n > 0 {
			s.p.log.Info("connections handed to the new process", "addr", s.t.key, "conns", n)
		}
	}()
	if s.inbox != nil {
		// Connections our parent still hands over get their goodbye as
		// they arrive; wait for the last one before counting.
		select {
		case <-s.received:
		case <-ctx.Done():
		}
	}
	if err := s.t.waitEmpty(ctx); err != nil {
		n := s.t.live()
		s.t.closeAll()
		s.t.forced.Add(int64(n))
		s.p.log.Warn("drain deadline: connections force-closed", "addr", s.t.key, "conns", n)
	}
	s.handlers.Wait()
	return nil
}
