package tenantpg

// links are the pointers an element needs to sit in a list. They are
// embedded in the element itself, so that keeping recency order costs no
// allocation and unlinking an element is O(1): a checkout that moves a
// database to the front touches three elements whatever the number of
// databases.
type links[T any] struct {
	prev, next *T
	listed     bool
}

// linked is satisfied by a pointer to an element that embeds links.
type linked[T any] interface {
	*T
	lnk() *links[T]
}

// list is an intrusive doubly-linked list. The budget keeps every list in
// recency order: front is most recently used, back is the next to evict.
// It is not safe for concurrent use; every list is guarded by budget.mu.
type list[T any, P linked[T]] struct {
	front, back *T
	len         int
}

func (l *list[T, P]) pushFront(e *T) {
	n := P(e).lnk()
	n.prev, n.next, n.listed = nil, l.front, true
	if l.front != nil {
		P(l.front).lnk().prev = e
	} else {
		l.back = e
	}
	l.front = e
	l.len++
}

func (l *list[T, P]) pushBack(e *T) {
	n := P(e).lnk()
	n.prev, n.next, n.listed = l.back, nil, true
	if l.back != nil {
		P(l.back).lnk().next = e
	} else {
		l.front = e
	}
	l.back = e
	l.len++
}

func (l *list[T, P]) remove(e *T) {
	n := P(e).lnk()
	if !n.listed {
		return
	}
	if n.prev != nil {
		P(n.prev).lnk().next = n.next
	} else {
		l.front = n.next
	}
	if n.next != nil {
		P(n.next).lnk().prev = n.prev
	} else {
		l.back = n.prev
	}
	n.prev, n.next, n.listed = nil, nil, false
	l.len--
}

func (l *list[T, P]) moveToFront(e *T) {
	if l.front == e {
		return
	}
	l.remove(e)
	l.pushFront(e)
}

// prev returns the element before e (towards the front), nil at the front.
func (l *list[T, P]) prev(e *T) *T { return P(e).lnk().prev }

// next returns the element after e (towards the back), nil at the back.
func (l *list[T, P]) next(e *T) *T { return P(e).lnk().next }
