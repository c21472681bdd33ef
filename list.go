package tenantpg

// links are the pointers an element needs to sit in a list. They are
// embedded in the element itself, so that keeping an order costs no
// allocation and unlinking an element is O(1). An element that sits in two
// lists at once (a waiter in its database's queue and in the budget's)
// embeds two, and each list names the one it uses through its accessor type.
type links[T any] struct {
	prev, next *T
	listed     bool
}

// linker picks an element's links for one kind of list. Implementations are
// zero-size types, so a list costs nothing beyond its three fields.
type linker[T any] interface {
	links(*T) *links[T]
}

// list is an intrusive doubly-linked list. It is not safe for concurrent
// use; every list in the package is guarded by budget.mu.
type list[T any, L linker[T]] struct {
	front, back *T
	len         int
}

func (l *list[T, L]) lnk(e *T) *links[T] {
	var acc L
	return acc.links(e)
}

func (l *list[T, L]) pushFront(e *T) {
	n := l.lnk(e)
	n.prev, n.next, n.listed = nil, l.front, true
	if l.front != nil {
		l.lnk(l.front).prev = e
	} else {
		l.back = e
	}
	l.front = e
	l.len++
}

func (l *list[T, L]) pushBack(e *T) {
	n := l.lnk(e)
	n.prev, n.next, n.listed = l.back, nil, true
	if l.back != nil {
		l.lnk(l.back).next = e
	} else {
		l.front = e
	}
	l.back = e
	l.len++
}

func (l *list[T, L]) remove(e *T) {
	n := l.lnk(e)
	if !n.listed {
		return
	}
	if n.prev != nil {
		l.lnk(n.prev).next = n.next
	} else {
		l.front = n.next
	}
	if n.next != nil {
		l.lnk(n.next).prev = n.prev
	} else {
		l.back = n.prev
	}
	n.prev, n.next, n.listed = nil, nil, false
	l.len--
}

func (l *list[T, L]) moveToFront(e *T) {
	if l.front == e {
		return
	}
	l.remove(e)
	l.pushFront(e)
}

// contains reports whether e is in a list of this kind.
func (l *list[T, L]) contains(e *T) bool { return l.lnk(e).listed }

// prev returns the element before e (towards the front), nil at the front.
func (l *list[T, L]) prev(e *T) *T { return l.lnk(e).prev }

// next returns the element after e (towards the back), nil at the back.
func (l *list[T, L]) next(e *T) *T { return l.lnk(e).next }
